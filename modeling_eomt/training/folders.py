"""Semantic segmentation folders as datasets: your own `images/` + `masks/`, and Cityscapes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ..configuration import IGNORE_INDEX
from ..configuration.labels import id2label as benchmark_id2label
from .annotations import SemanticLabels, read_json, scan_semantic_values, semantic_example
from .dataset import Example, SegmentationDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Cityscapes `labelIds` -> train ids (19 evaluated classes); every other id is ignored.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def _files_by_stem(folder: Path, extensions: Sequence[str], suffix: str = "") -> dict[str, Path]:
    """Files under `folder` keyed by relative path without extension (and without `suffix`)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions and path.stem.endswith(suffix):
            key = path.relative_to(folder).with_suffix("").as_posix()
            found[key[: len(key) - len(suffix)]] = path
    return found


def _match_pairs(images: dict[str, Path], masks: dict[str, Path], image_root: Path, mask_root: Path):
    problems = []
    for what, names in (
        ("image(s) without a mask", set(images) - set(masks)),
        ("mask(s) without an image", set(masks) - set(images)),
    ):
        if names:
            problems.append(f"{len(names)} {what} (e.g. {sorted(names)[:5]})")
    if problems:
        raise ValueError(
            f"Images in {image_root} and masks in {mask_root} must match by file name (without extension): "
            + "; ".join(problems)
        )
    if not images:
        raise ValueError(f"No images found in {image_root}.")
    return [(images[key], masks[key]) for key in sorted(images)]


def semantic_folder_dataset(
    root: str | os.PathLike,
    split: str | None = None,
    classes: Mapping[Any, str | None] | str | os.PathLike | None = None,
    ignore_index: int | None = IGNORE_INDEX,
    image_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
) -> SegmentationDataset:
    """
    Your own semantic data: `root/images/` and `root/masks/` (or `root/images/<split>/`, `root/masks/<split>/`),
    matched by relative file name without extension. Masks hold integer class values (grayscale or palette PNG) or
    RGB colours. `classes` (a mapping, or a JSON file; default `root/classes.json` if present) maps mask values to
    class names (see [`SemanticLabels.from_classes`]); without it the integer values are the class ids.
    """
    root = Path(root)
    image_root = Path(image_dir) if image_dir else _pick_split(root / "images", split)
    mask_root = (
        Path(mask_dir)
        if mask_dir
        else _pick_split(
            next((root / n for n in ("masks", "annotations", "labels") if (root / n).is_dir()), root / "masks"), split
        )
    )
    for folder, argument in ((image_root, "image_dir"), (mask_root, "mask_dir")):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist; lay out images/ and masks/ under {root} or pass `{argument}=`."
            )
    images = _files_by_stem(image_root, IMAGE_EXTENSIONS)
    pairs = _match_pairs(images, _files_by_stem(mask_root, (".png", ".tif", ".tiff", ".bmp")), image_root, mask_root)
    if classes is None and (root / "classes.json").is_file():
        classes = root / "classes.json"
    if isinstance(classes, (str, os.PathLike)):
        classes = read_json(Path(classes))
    labels = (
        SemanticLabels.from_classes(classes, ignore_index)
        if classes is not None
        else scan_semantic_values((mask for _, mask in pairs), ignore_index)
    )
    return SegmentationDataset(
        pairs,
        partial(_decode_semantic_record, labels=labels),
        source_task="semantic",
        task="semantic",
        id2label=labels.id2label,
    )


def _pick_split(folder: Path, split: str | None) -> Path:
    return folder / split if split and (folder / split).is_dir() else folder


def _decode_semantic_record(record, labels: SemanticLabels) -> Example:
    image_path, mask_path = record
    return semantic_example(image_path, mask_path, labels, name=str(mask_path))


def cityscapes_dataset(root: str | os.PathLike, split: str = "train") -> SegmentationDataset:
    """Cityscapes in its folders: `leftImg8bit/<split>/<city>/*_leftImg8bit.png` with
    `gtFine/<split>/<city>/*_gtFine_labelTrainIds.png` (or `*_gtFine_labelIds.png`, mapped to train ids)."""
    root = Path(root)
    image_root, mask_root = root / "leftImg8bit" / split, root / "gtFine" / split
    images = _files_by_stem(image_root, (".png",), "_leftImg8bit")
    masks = _files_by_stem(mask_root, (".png",), "_gtFine_labelTrainIds")
    id2label = benchmark_id2label("cityscapes_semantic")
    labels = SemanticLabels.identity(id2label)
    if not masks:  # only raw label ids: map them to train ids
        masks = _files_by_stem(mask_root, (".png",), "_gtFine_labelIds")
        labels = SemanticLabels(CITYSCAPES_ID_TO_TRAIN_ID, id2label, default=IGNORE_INDEX)
    return SegmentationDataset(
        _match_pairs(images, masks, image_root, mask_root),
        partial(_decode_semantic_record, labels=labels),
        source_task="semantic",
        task="semantic",
        id2label=id2label,
    )
