"""
The one form every training example takes, whatever its source, and the dataset object that serves it.

Every example is a `dict` with
- `image`: uint8 tensor [3, H, W] (RGB),
- `masks`: bool tensor [N, H, W], one mask per segment (panoptic), object (instance) or class present (semantic),
- `class_labels`: int64 tensor [N], contiguous class ids (keys of the dataset's `id2label`),
- `is_crowd`: bool tensor [N] (panoptic and instance only).

The sources (`coco.py`, `folders.py`, `hub.py`, `shapes.py`) build a [`SegmentationDataset`] from their records and
a function decoding one record (`annotations.py`); `loading.py` picks the source for a name or path.
"""

from __future__ import annotations

import copy
import multiprocessing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

from ..configuration import TASKS

logger = logging.get_logger(__name__)

Example = dict[str, torch.Tensor]


class UnreadableSampleError(OSError):
    """An example whose image or annotation cannot be read (missing, truncated or not an image); names the file."""


class SharedInt:
    """An int in shared memory that worker processes started with it (DataLoader workers, persistent ones too) see
    change; pickled in any other way (a deep copy, a cache) it is copied by value."""

    def __init__(self, value: int = 0):
        self._shared = multiprocessing.RawValue("q", value)

    @property
    def value(self) -> int:
        return self._shared.value

    @value.setter
    def value(self, value: int) -> None:
        self._shared.value = value

    def __reduce__(self):
        if multiprocessing.context.get_spawning_popen() is not None:  # pickled to start a process: share
            return _shared_int, (self._shared,)
        return SharedInt, (self.value,)


def _shared_int(shared) -> SharedInt:
    value = SharedInt.__new__(SharedInt)
    value._shared = shared
    return value


class SegmentationDataset(torch.utils.data.Dataset):
    """
    A map-style dataset of examples in the common form (see the module docstring).

    Args:
        records (`Sequence`):
            One entry per example (a `datasets.Dataset`, a list of file records, a `range`, ...).
        decode (`Callable`):
            Turns one record into an example of the source's own task.
        source_task (`str`):
            Task of the annotations (`"panoptic"`, `"instance"` or `"semantic"`).
        task (`str`):
            Task to train for. Panoptic annotations also serve instance (things only) and semantic (segments
            merged per class) training; instance annotations also serve semantic training.
        id2label (`Mapping[int, str]`):
            Contiguous class ids of the source annotations and their names.
        stuff_ids (`Iterable[int]`, *optional*):
            Ids of the stuff classes (panoptic sources).
        transform (`Callable`, *optional*):
            Called as `transform(example, generator=...)` on every example (e.g. the training augmentation).
        seed (`int`, *optional*):
            If set, the transform of example `i` in epoch `e` draws from a generator seeded by `(seed, e, i)`, so
            augmentations do not depend on loading order or worker processes. Otherwise the transform uses the
            global torch RNG (which the Trainer seeds and checkpoints).

    Attributes:
        skip_unreadable (`bool`, defaults to `False`):
            If set, an example whose file cannot be read ([`UnreadableSampleError`]) is `None` (the collators drop
            it) and a warning names the file; otherwise the error stops the run.
    """

    def __init__(
        self,
        records: Sequence[Any],
        decode: Callable[[Any], Example],
        *,
        source_task: str,
        task: str,
        id2label: Mapping[int, str],
        stuff_ids: Iterable[int] = (),
        transform: Callable[..., Example] | None = None,
        seed: int | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
        allowed = {"panoptic": TASKS, "instance": ("instance", "semantic"), "semantic": ("semantic",)}[source_task]
        if task not in allowed:
            raise ValueError(
                f"This dataset has {source_task} annotations, which cannot train the {task} task; "
                f"use task={' or '.join(repr(t) for t in allowed)}."
            )
        self.records = records
        self.decode = decode
        self.source_task = source_task
        self.task = task
        self.transform = transform
        self.seed = seed
        self.skip_unreadable = False
        # Shared: persistent DataLoader workers keep their copy of the dataset across epochs.
        self._epoch = SharedInt()
        stuff_ids = set(stuff_ids)
        id2label = {int(k): v for k, v in id2label.items()}
        # Instance training from panoptic data keeps the thing classes, renumbered 0..K-1 in their original order.
        self._label_map = None
        if task == "instance" and source_task == "panoptic":
            things = [k for k in sorted(id2label) if k not in stuff_ids]
            self._label_map = torch.full((max(id2label) + 1,), -1, dtype=torch.int64)
            self._label_map[things] = torch.arange(len(things))
            id2label = {new: id2label[old] for new, old in enumerate(things)}
        self.id2label = id2label
        self.stuff_ids = tuple(sorted(stuff_ids)) if task == "panoptic" else ()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example | None:
        try:
            example = self.decode(self.records[index])
        except UnreadableSampleError as error:
            if not self.skip_unreadable:
                raise UnreadableSampleError(
                    f"{error}; replace or remove the file, or skip unreadable examples with a warning "
                    "(`skip_unreadable`, `--skip_unreadable` in eomt-train)"
                ) from error
            logger.warning(f"Skipping unreadable example {index}: {error}")
            return None
        example = _convert_task(example, self.source_task, self.task, self._label_map)
        if self.transform is None:
            return example
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & (2**63 - 1))
        return self.transform(example, generator=generator)

    def with_transform(self, transform: Callable[..., Example] | None, seed: int | None = None) -> SegmentationDataset:
        """A view of the same data with another transform (e.g. augmentation for training, resizing for eval)."""
        view = self._view()
        view.transform, view.seed = transform, seed
        view.set_epoch(0)
        return view

    def select(self, indices: Iterable[int]) -> SegmentationDataset:
        """A view of the examples at `indices` (e.g. `range(100)` for the first hundred)."""
        indices = list(indices)
        view = self._view()
        # A `datasets.Dataset` sliced with [] would give a dict of columns; it has its own `select`.
        view.records = (
            self.records.select(indices) if hasattr(self.records, "select") else [self.records[i] for i in indices]
        )
        return view

    def set_epoch(self, epoch: int):
        """Called by the Trainer/accelerate at each epoch; changes the seeded augmentations (see `seed`), in the
        DataLoader's worker processes too."""
        self._epoch.value = epoch

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def _view(self) -> SegmentationDataset:
        view = copy.copy(self)
        view._epoch = SharedInt(self.epoch)  # its own epoch, not the original's
        return view

    @property
    def label2id(self) -> dict[str, int]:
        return {name: k for k, name in self.id2label.items()}


def _convert_task(example: Example, source_task: str, task: str, label_map: torch.Tensor | None) -> Example:
    if task == source_task:
        return example
    if task == "instance":  # from panoptic: drop stuff
        labels = label_map[example["class_labels"]]
        keep = labels >= 0
        return {
            **example,
            "masks": example["masks"][keep],
            "class_labels": labels[keep],
            "is_crowd": example["is_crowd"][keep],
        }
    # semantic: one mask per class present, crowd regions included
    classes = example["class_labels"].unique()
    masks = [example["masks"][example["class_labels"] == c].any(0) for c in classes]
    return {
        "image": example["image"],
        "masks": torch.stack(masks) if masks else example["masks"],
        "class_labels": classes,
    }
