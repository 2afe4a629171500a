"""Real kills in the middle of saves (issue 18): a Trainer checkpoint, a conversion and `eomt-train`'s final save.
Each run happens in a forked process in which one write step SIGKILLs the process; the test then checks what the kill
left on disk and what the next run makes of it: resume picks the last complete checkpoint, staging is cleaned up,
the output is the previous complete one or none, and files get the umask's permissions."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from modeling_eomt.convert import convert as convert_module
from modeling_eomt.convert import convert_checkpoint
from PIL import Image
from safetensors.torch import load_file
from test_convert import original_config, original_state_dict, save_folder, use_tiny_sizes
from test_pipeline import save_tiny_checkpoint
from test_train import train_args
from transformers import Trainer

from modeling_eomt import EomtForUniversalSegmentation, EomtImageProcessor
from modeling_eomt.cli import main as eomt_main
from modeling_eomt.training import EomtTrainer
from modeling_eomt.training.train import main as train_main


def killed_run(run: Callable[[], object], owner, name: str, when: Callable[..., bool], before: bool = False) -> None:
    """`run()` in a forked process where `owner.<name>` SIGKILLs the process right after (or `before`) a call whose
    arguments satisfy `when`; the process must die of that kill."""

    def child() -> None:
        torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork
        original = getattr(owner, name)

        def kill_when(*args, **kwargs):
            if before and when(*args):
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if when(*args):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, kill_when)
        run()

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(timeout=600)
    assert process.exitcode == -signal.SIGKILL, f"the run was not killed (exit code {process.exitcode})"


def assert_umask_permissions(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in folder.iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ------------------------------------------------------------------------------------------ Trainer checkpoints
def checkpointed(output_dir: Path, *extra: str) -> list[str]:
    """`eomt-train` for 4 steps with a checkpoint every 2."""
    return train_args(output_dir, steps=4, extra=("--save_strategy", "steps", "--save_steps", "2", *extra))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the 4-step run without checkpoints, which every resumed run must reproduce bit for bit."""
    output = tmp_path_factory.mktemp("uninterrupted")
    assert train_main(train_args(output, steps=4, extra=("--save_strategy", "no"))) == 0
    return load_file(output / "model.safetensors")


def is_checkpoint_4(trainer, output_dir: str) -> bool:
    return output_dir.endswith("checkpoint-4")


def test_a_kill_during_a_checkpoint_leaves_only_complete_checkpoints(tmp_path, uninterrupted):
    """Killed after checkpoint-4's weights are written (before its optimizer and trainer state): no checkpoint-4
    appears; resuming from the latest checkpoint continues from checkpoint-2, as if never interrupted, and the
    re-save of step 4 removes the staged remains."""
    output = tmp_path / "out"
    killed_run(lambda: train_main(checkpointed(output)), Trainer, "_save_optimizer_and_scheduler", is_checkpoint_4,
               before=True)  # fmt: skip
    assert names(output) == [".staging", "checkpoint-2"]
    staged = names(output / ".staging" / "checkpoint-4")  # the kill came mid-save
    assert "model.safetensors" in staged and "trainer_state.json" not in staged
    assert train_main(checkpointed(output, "--resume_from_checkpoint", "latest")) == 0
    weights = load_file(output / "model.safetensors")
    assert all(torch.equal(weights[name], uninterrupted[name]) for name in uninterrupted)
    assert ".staging" not in names(output) and {"checkpoint-2", "checkpoint-4"} <= set(names(output))
    assert_umask_permissions(output / "checkpoint-4")


def test_resume_skips_a_checkpoint_an_unstaged_save_left_half_written(tmp_path, uninterrupted, caplog):
    """What the plain Trainer (or an older version of ours) leaves when killed mid-checkpoint: `checkpoint-4/` with
    weights but no trainer state. Resuming names it in a warning, skips it and continues from checkpoint-2."""
    output = tmp_path / "out"

    def unstaged_training():
        EomtTrainer._save_checkpoint = Trainer._save_checkpoint
        train_main(checkpointed(output))

    killed_run(unstaged_training, Trainer, "_save_optimizer_and_scheduler", is_checkpoint_4, before=True)
    partial = names(output / "checkpoint-4")
    assert "model.safetensors" in partial and "trainer_state.json" not in partial
    with caplog.at_level("WARNING"):
        assert train_main(checkpointed(output, "--resume_from_checkpoint", "latest")) == 0
    assert any(
        f"Skipping checkpoint {output / 'checkpoint-4'}: its trainer_state.json is missing" in record.getMessage()
        for record in caplog.records
    )
    weights = load_file(output / "model.safetensors")
    assert all(torch.equal(weights[name], uninterrupted[name]) for name in uninterrupted)


# ---------------------------------------------------------------------------------------------------- final save
def final_save(output: Path) -> list[str]:
    return train_args(output, steps=1, extra=("--save_strategy", "no"))


def into_output(output: Path) -> Callable[..., bool]:
    return lambda source, target: Path(target).parent == output


def test_a_kill_during_the_final_save_leaves_the_previous_output_or_no_model(tmp_path):
    """Killed while the model is written into staging: the previous complete output is untouched. Killed while the
    files are renamed into place: no model at all (the old weights go first), never weights beside another run's
    config, processor or card. The next run cleans up and publishes a complete model."""
    output = tmp_path / "out"
    assert train_main(final_save(output)) == 0
    previous = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(previous)

    def is_final(trainer, folder):
        return Path(folder).name == "final"

    killed_run(lambda: train_main(final_save(output)), EomtTrainer, "save_model", is_final)
    assert {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()} == previous
    assert "model.safetensors" in names(output / ".staging" / "final")

    killed_run(lambda: train_main(final_save(output)), os, "replace", into_output(output))
    assert not any(path.suffix == ".safetensors" for path in output.iterdir())

    assert train_main(final_save(output)) == 0
    assert ".staging" not in names(output)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(names(output))
    EomtForUniversalSegmentation.from_pretrained(output), EomtImageProcessor.from_pretrained(output)
    assert_umask_permissions(output)


# ---------------------------------------------------------------------------------------------------- conversion
def test_a_killed_conversions_staging_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """Killed after the weights are written: only a hidden staging folder is left, no output. The next conversion
    removes it (but not the staging of a conversion still running, nor folders that are not ours) and writes a
    complete output with the umask's permissions."""
    use_tiny_sizes(monkeypatch)
    source = save_folder(tmp_path / "ckpt", original_state_dict(), original_config())
    output = tmp_path / "out"

    def convert():
        convert_checkpoint(source, output, task="panoptic", progress=False)

    killed_run(convert, convert_module, "write_weights", lambda *args: True)
    (stale,) = [path for path in tmp_path.iterdir() if path.name.startswith(".out.")]
    assert not output.exists() and "model.safetensors" in names(stale)
    dead_pid = int(stale.name.split(".")[2])
    running = tmp_path / f".out.{os.getpid()}.{'b' * 32}"  # another conversion's, still in progress
    unrelated = tmp_path / f".out.{dead_pid}.notours"
    for folder in (running, unrelated):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    convert()
    assert not stale.exists() and running.exists() and unrelated.exists()
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(names(output))
    assert_umask_permissions(output)


# ----------------------------------------------------------------------------------------------- eomt segment
def test_segment_outputs_get_the_umask_permissions(tmp_path):
    save_tiny_checkpoint(tmp_path / "model", EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (60, 40)).save(tmp_path / "images" / "street.png")
    args = ["segment", tmp_path / "images", "--model", tmp_path / "model", "--output", tmp_path / "out"]
    assert eomt_main([str(arg) for arg in args]) == 0
    assert names(tmp_path / "out") == ["street.json", "street.png"]
    assert_umask_permissions(tmp_path / "out")
