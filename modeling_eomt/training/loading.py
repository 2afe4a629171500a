"""
[`load_segmentation_dataset`]: one entry point that picks the source of a name or path.

Sources:
- `"shapes"`: the built-in synthetic panoptic set (`shapes.py`).
- Hub ids and local `datasets` folders (`load_dataset` / `load_from_disk` / imagefolder with `metadata.jsonl`):
  ADE20K semantic `zhoubolei/scene_parse_150` (`image`, `annotation`; ids 1-150 become 0-149, 0 is ignored),
  Cityscapes semantic (train ids 0-18, 255 ignored), COCO-style panoptic (`image`, a panoptic PNG column,
  `segments_info`) and instance (`image`, `objects` or `annotations` with polygons/RLE) tables (`hub.py`).
- COCO files in their original layout (`annotations/panoptic_val2017.json` + `annotations/panoptic_val2017/`
  + `val2017/`, or `annotations/instances_val2017.json` + `val2017/`), or any COCO JSON of your own (`coco.py`).
- Cityscapes folders (`leftImg8bit/` + `gtFine/`) and your own semantic data: `images/` + `masks/` matched by file
  name, integer or RGB-coded masks, mapped by `classes` (which can merge values into one class and ignore values)
  (`folders.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from ..configuration import IGNORE_INDEX, TASKS
from .coco import coco_json_dataset
from .dataset import SegmentationDataset
from .folders import cityscapes_dataset, semantic_folder_dataset
from .hub import hf_dataset
from .shapes import shapes_dataset


def benchmark_key(name: str, task: str) -> str | None:
    """The benchmark (a key of `configuration.labels`) a dataset name refers to, for its labels and id convention."""
    lowered = name.lower()
    if "scene_parse" in lowered or "ade20k" in lowered or "ade_20k" in lowered:
        return "ade20k_panoptic" if task == "panoptic" else "ade20k_semantic"
    if "cityscapes" in lowered:
        return "cityscapes_semantic"
    if "coco" in lowered:
        return "coco_panoptic" if task == "panoptic" else "coco_instance"
    return None


def load_segmentation_dataset(
    name_or_path: str | os.PathLike,
    task: str = "panoptic",
    split: str = "train",
    *,
    dataset_config_name: str | None = None,
    dataset_key: str | None = None,
    classes: Any = None,
    ignore_index: int | None = IGNORE_INDEX,
    image_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    **load_kwargs,
) -> SegmentationDataset:
    """
    Load a segmentation dataset as a [`SegmentationDataset`] (with `.id2label` and, for panoptic, `.stuff_ids`).

    Args:
        name_or_path (`str` or `os.PathLike`):
            `"shapes"`; a Hub dataset id (e.g. `"zhoubolei/scene_parse_150"`); a folder saved with `save_to_disk`;
            a COCO JSON file or a folder in the COCO layout; a Cityscapes folder; an `images/` + `masks/` folder; or
            any folder `datasets.load_dataset` reads (imagefolder with `metadata.jsonl`, parquet, ...).
        task (`str`):
            `"panoptic"`, `"instance"` or `"semantic"`.
        split (`str`):
            Split to load (`"train"`, `"validation"`, ...). For `shapes`, `"train"` and every other split use
            different seeds.
        dataset_config_name (`str`, *optional*):
            Hub config (e.g. `"scene_parsing"`).
        dataset_key (`str`, *optional*):
            Benchmark whose labels and id convention apply (a key of `configuration.labels`: `"ade20k_semantic"`,
            `"cityscapes_semantic"`, `"coco_panoptic"`, ...); guessed from the name when not given.
        classes (*optional*):
            Your classes: for semantic masks a mapping mask value -> class name (or `None` to ignore); for
            panoptic/instance tables a COCO `categories` list or `{category_id: name}`.
        ignore_index (`int`, *optional*, defaults to 255):
            Integer mask value that marks void pixels in your semantic masks.
        image_dir, mask_dir (*optional*):
            Folders of images and masks, when they are not where the layout expects them.
        load_kwargs:
            Passed to `datasets.load_dataset` (e.g. `revision`, `data_dir`, `cache_dir`); for `shapes`:
            `num_examples`, `image_size`, `seed`.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    name = str(name_or_path)
    if name == "shapes":
        seed = load_kwargs.pop("seed", 0) + (0 if split == "train" else 1_000_003)
        num_examples = load_kwargs.pop("num_examples", 2000 if split == "train" else 200)
        return shapes_dataset(num_examples, seed=seed, task=task, **load_kwargs)
    key = dataset_key or benchmark_key(name, task)
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{path} is a file but not a COCO JSON; pass a JSON file, a folder or a Hub id.")
        return coco_json_dataset(path, task, image_dir, mask_dir, split)
    if path.is_dir():
        return _local_folder(path, task, split, key, classes, ignore_index, image_dir, mask_dir, load_kwargs)

    kwargs = dict(load_kwargs)
    if name in _PARQUET_EXPORTS:  # its configs are folders of the export
        kwargs = {
            "revision": "refs/convert/parquet",
            "data_dir": dataset_config_name or _PARQUET_EXPORTS[name],
            **kwargs,
        }
    elif dataset_config_name is not None:
        kwargs["name"] = dataset_config_name
    try:
        dataset = datasets.load_dataset(name, split=split, **kwargs)
    except (ConnectionError, OSError) as error:
        raise OSError(
            f"Could not load {name!r} from the Hub ({error}). Without network, point `name_or_path` at a local copy "
            "(a folder saved with `save_to_disk`, an imagefolder, COCO files or Cityscapes folders)."
        ) from error
    return hf_dataset(dataset, task, key, classes, ignore_index)


# Loading-script datasets (which recent `datasets` refuses to run) -> default config; their parquet export is read.
_PARQUET_EXPORTS = {"zhoubolei/scene_parse_150": "scene_parsing"}


def _local_folder(path: Path, task, split, key, classes, ignore_index, image_dir, mask_dir, load_kwargs):

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            split = split if split in dataset else _SPLIT_ALIASES.get(split, split)
            if split not in dataset:
                raise ValueError(f"{path} has splits {list(dataset)}, not {split!r}; pass one of them as `split`.")
            dataset = dataset[split]
        return hf_dataset(dataset, task, key, classes, ignore_index)
    dataset = _known_layout(path, task, _folder_split(path, split), classes, ignore_index, image_dir, mask_dir)
    if dataset is not None:
        return dataset
    dataset = datasets.load_dataset(str(path), split=split, **load_kwargs)
    return hf_dataset(dataset, task, key, classes, ignore_index)


_SPLIT_ALIASES = {"validation": "val", "val": "validation"}


def _folder_split(path: Path, split: str) -> str:
    """`split` or its other name (`datasets` says "validation", COCO and Cityscapes folders "val"), whichever the
    folder has files or a subfolder for."""
    for name in dict.fromkeys([split, _SPLIT_ALIASES.get(split, split)]):
        markers = [path / "leftImg8bit" / name, path / f"{name}.json", path / "images" / name]
        if any(marker.exists() for marker in markers) or any((path / "annotations").glob(f"*_{name}2017.json")):
            return name
    return split


def _known_layout(path: Path, task, split, classes, ignore_index, image_dir, mask_dir) -> SegmentationDataset | None:
    """`split` of a COCO, Cityscapes, COCO-JSON or images + masks folder; None for other layouts."""
    # COCO layout; instance and semantic training can also use the other kind of annotation file.
    kinds = {"panoptic": ("panoptic",), "instance": ("instances", "panoptic"), "semantic": ("panoptic", "instances")}
    for kind in kinds[task]:
        coco = path / "annotations" / f"{kind}_{split}2017.json"
        if coco.is_file():
            return coco_json_dataset(coco, task, image_dir, mask_dir, split)
    if (path / "leftImg8bit").is_dir() and (path / "gtFine").is_dir():
        if not (path / "leftImg8bit" / split).is_dir():
            splits = sorted(p.name for p in (path / "leftImg8bit").iterdir() if p.is_dir())
            raise ValueError(f"Cityscapes folder {path} has splits {splits}, not {split!r}; pass one of them.")
        return cityscapes_dataset(path, split)
    own_json = [p for p in (path / f"{split}.json", path / "annotations.json") if p.is_file()]
    if own_json:
        return coco_json_dataset(own_json[0], task, image_dir, mask_dir, split)
    if (path / "images").is_dir() and any((path / name).is_dir() for name in ("masks", "annotations", "labels")):
        if task != "semantic":
            raise ValueError(
                f"{path} holds images/ and masks/, semantic data, which cannot train the {task} task; use "
                f"task='semantic' (--task semantic), or give {task} data as a COCO {task} JSON with its images."
            )
        return semantic_folder_dataset(path, split, classes, ignore_index, image_dir, mask_dir)
    return None
