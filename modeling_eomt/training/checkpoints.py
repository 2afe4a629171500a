"""Saving that a kill cannot leave half-done, and resuming that skips what an older, unstaged save left half-done.

Checkpoints and the final model are written into `<output_dir>/.staging/` and then renamed into place: a checkpoint
folder as a whole (one rename), the final model file by file with the weights last, so that weights in
`output_dir` always come with their config, processor and card.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from transformers.utils import logging

from ..umask import apply_umask

logger = logging.get_logger(__name__)

STAGING_DIR = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def publish(staging: Path, target: Path) -> None:
    """Move the files of `staging` into `target` (weights last, config just before them), then remove `staging`
    (and the staging root if that leaves it empty). Weights already in `target` are deleted first: a kill midway then
    leaves no model, never the old weights beside the new config (or stale shards beside new ones)."""
    target.mkdir(parents=True, exist_ok=True)
    apply_umask(staging)
    for old in target.iterdir():
        if old.is_file() and _publish_order(old)[0] == 2:
            old.unlink()
    for path in sorted(staging.iterdir(), key=_publish_order):
        os.replace(path, target / path.name)
    staging.rmdir()
    _remove_if_empty(staging.parent)


def _publish_order(path: Path) -> tuple[int, str]:
    if path.suffix == ".safetensors" or path.name in _WEIGHTS_NAMES or path.name.startswith("pytorch_model"):
        return 2, path.name
    return (1 if path.name == "config.json" else 0), path.name


def replace_folder(staged: Path, final: Path) -> None:
    """Rename the finished folder `staged` to `final`, replacing a folder of that name (a re-save of the step)."""
    apply_umask(staged)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    _remove_if_empty(staged.parent)


def _remove_if_empty(folder: Path) -> None:
    if folder.name == STAGING_DIR and not any(folder.iterdir()):
        folder.rmdir()


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (missing or unreadable trainer state or weights), or `None`."""
    if not folder.is_dir():
        return "no such folder"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "its trainer_state.json is missing or incomplete (the save was interrupted)"
    weights = [folder / name for name in _WEIGHTS_NAMES if (folder / name).is_file()]
    if not weights:
        return "it holds no model weights (the save was interrupted)"
    if weights[0].name == "model.safetensors":
        try:
            with safe_open(str(weights[0]), framework="pt"):  # reads the header, checks it against the file size
                pass
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a truncated file
            return f"its model.safetensors is unreadable ({error})"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint-N` folder of `output_dir` with the highest N that can be resumed from; each newer one that
    cannot gets a warning."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _CHECKPOINT.match(path.name))]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(f"Skipping checkpoint {path}: {problem}.")
    return None
