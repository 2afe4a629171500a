"""Staged saving and resumable checkpoints: the file order of a publish, and what makes a checkpoint incomplete."""

import json
import os

import torch
from safetensors.torch import save_file

from modeling_eomt.training.checkpoints import checkpoint_problem, latest_complete_checkpoint, publish


def test_publish_moves_weights_last_and_config_just_before(tmp_path, monkeypatch):
    staging, target = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    names = ["model.safetensors", "README.md", "config.json", "preprocessor_config.json", "training_args.bin"]
    for name in names:
        (staging / name).write_text(name)
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moved.append(os.path.basename(dst)), real_replace(src, dst)))
    publish(staging, target)
    assert moved[-2:] == ["config.json", "model.safetensors"] and sorted(moved) == sorted(names)
    assert not staging.exists() and all((target / name).read_text() == name for name in names)


def complete_checkpoint(folder, step: int = 2):
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_incomplete_checkpoints_are_named_and_skipped(tmp_path, caplog):
    assert checkpoint_problem(complete_checkpoint(tmp_path / "checkpoint-2")) is None
    truncated = complete_checkpoint(tmp_path / "checkpoint-4", 4)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "model.safetensors is unreadable" in checkpoint_problem(truncated)
    no_state = complete_checkpoint(tmp_path / "checkpoint-6", 6)
    (no_state / "trainer_state.json").write_text('{"global_st')
    assert "trainer_state.json" in checkpoint_problem(no_state)
    no_weights = complete_checkpoint(tmp_path / "checkpoint-10", 10)
    (no_weights / "model.safetensors").unlink()
    assert "no model weights" in checkpoint_problem(no_weights)
    with caplog.at_level("WARNING"):
        assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"  # 10 > 6 > 4 > 2, by number
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"Skipping checkpoint {tmp_path / name}" for name in ("checkpoint-10", "checkpoint-6", "checkpoint-4")
    ]
    assert latest_complete_checkpoint(tmp_path / "missing") is None
