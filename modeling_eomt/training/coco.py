"""COCO panoptic and instance annotation files (the original layout or any COCO JSON of your own) as datasets."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from .annotations import categories_of, instance_example, panoptic_example, read_json
from .dataset import Example, SegmentationDataset


def _find_folder(candidates: Iterable[Path], probe: str, what: str, argument: str) -> Path:
    """The first candidate folder that contains `probe` (a file name from the annotations)."""
    candidates = list(dict.fromkeys(candidates))
    for folder in candidates:
        if (folder / probe).is_file():
            return folder
    raise FileNotFoundError(
        f"Cannot find the {what} {probe!r}; looked in {', '.join(str(c) for c in candidates)}. "
        f"Pass `{argument}=` with the folder that holds them."
    )


def coco_json_dataset(
    json_path: str | os.PathLike,
    task: str | None = None,
    image_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    split: str = "train",
) -> SegmentationDataset:
    """
    A COCO panoptic or instance JSON with its images (and panoptic PNGs). Folders are found next to the JSON in
    the COCO layout (`annotations/panoptic_val2017.json`, `annotations/panoptic_val2017/`, `val2017/`) or as
    `images/` and `masks/` beside it, unless given. Every referenced file must exist.
    """
    json_path = Path(json_path)
    data = read_json(json_path)
    panoptic = _check_coco(data, json_path)
    source_task = "panoptic" if panoptic else "instance"
    category_to_label, id2label, stuff = categories_of(data["categories"])
    images = {image["id"]: image for image in data["images"]}
    if not images:
        raise ValueError(f"{json_path} lists no images.")
    here, stem = json_path.parent, json_path.stem
    split_folder = f"{split}2017"
    first = next(iter(images.values()))["file_name"]
    image_root = _find_folder(
        [Path(image_dir)]
        if image_dir
        else [here / "images", here.parent / split_folder, here / split_folder, here.parent / "images", here],
        first,
        "image",
        "image_dir",
    )
    missing = [i["file_name"] for i in images.values() if not (image_root / i["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {json_path} are not in {image_root}: {missing[:5]}"
        )

    if panoptic:
        unknown = [a["image_id"] for a in data["annotations"] if a["image_id"] not in images]
        if unknown:
            raise ValueError(f"{json_path}: annotations refer to unknown image ids {unknown[:5]}.")
        mask_root = _find_folder(
            [Path(mask_dir)] if mask_dir else [here / stem, here / "masks", here / "panoptic", here.parent / stem],
            data["annotations"][0]["file_name"],
            "panoptic PNG",
            "mask_dir",
        )
        missing = [a["file_name"] for a in data["annotations"] if not (mask_root / a["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} panoptic PNG(s) are not in {mask_root}: {missing[:5]}")
        records = [
            (image_root / images[a["image_id"]]["file_name"], mask_root / a["file_name"], a["segments_info"])
            for a in data["annotations"]
        ]
        decode = partial(_decode_panoptic_record, category_to_label=category_to_label)
    else:
        by_image: dict[Any, list] = {image_id: [] for image_id in images}
        for annotation in data["annotations"]:
            if annotation["image_id"] not in by_image:
                raise ValueError(f"{json_path}: an annotation refers to unknown image id {annotation['image_id']}.")
            by_image[annotation["image_id"]].append(annotation)
        records = [(image_root / images[i]["file_name"], anns) for i, anns in by_image.items()]
        decode = partial(_decode_instance_record, category_to_label=category_to_label)
    return SegmentationDataset(
        records, decode, source_task=source_task, task=task or source_task, id2label=id2label, stuff_ids=stuff
    )


# The lists of a COCO file, and the fields every entry of each needs (per kind of file for the annotations).
_COCO_KEYS = ("images", "annotations", "categories")
_COCO_FIELDS = {
    "images": ("id", "file_name"),
    "categories": ("id", "name"),
    "panoptic annotations": ("image_id", "file_name", "segments_info"),
    "segments_info": ("id", "category_id"),
    "instance annotations": ("image_id", "category_id", "segmentation"),
}


def _check_coco(data: Any, path: Path) -> bool:
    """Whether `data` is a panoptic (else instance) COCO file; a one-line error naming the first malformed entry,
    so that a broken file fails when it is loaded, not in a DataLoader worker mid-training."""
    if not isinstance(data, Mapping) or any(not isinstance(data.get(key), list) for key in _COCO_KEYS):
        raise ValueError(f"{path} is not a COCO annotation file: it needs the lists {', '.join(_COCO_KEYS)}.")
    first = data["annotations"][0] if data["annotations"] else {}
    panoptic = isinstance(first, Mapping) and "segments_info" in first
    lists = [
        ("images", data["images"], "images"),
        ("categories", data["categories"], "categories"),
        ("annotations", data["annotations"], "panoptic annotations" if panoptic else "instance annotations"),
    ]
    for where, entries, fields in lists:
        for i, entry in enumerate(entries):
            _check_entry(entry, _COCO_FIELDS[fields], f"{path}: {where}[{i}]")
            if where == "annotations" and panoptic:
                if not isinstance(entry["segments_info"], list):
                    raise ValueError(f"{path}: {where}[{i}].segments_info must be a list of segments.")
                for j, segment in enumerate(entry["segments_info"]):
                    _check_entry(segment, _COCO_FIELDS["segments_info"], f"{path}: {where}[{i}].segments_info[{j}]")
    return panoptic


def _check_entry(entry: Any, fields: tuple[str, ...], where: str) -> None:
    missing = [field for field in fields if field not in entry] if isinstance(entry, Mapping) else fields
    if missing:
        raise ValueError(f"{where} has no {missing[0]!r}; every such entry is an object with {', '.join(fields)}.")


def _decode_panoptic_record(record, category_to_label) -> Example:
    image_path, png_path, segments_info = record
    return panoptic_example(image_path, png_path, segments_info, category_to_label, name=str(png_path))


def _decode_instance_record(record, category_to_label) -> Example:
    image_path, annotations = record
    return instance_example(image_path, annotations, category_to_label, name=str(image_path))
