"""
Segmentation datasets in one per-example form, whatever their source.

Every example is a `dict` with
- `image`: uint8 tensor [3, H, W] (RGB),
- `masks`: bool tensor [N, H, W], one mask per segment (panoptic), object (instance) or class present (semantic),
- `class_labels`: int64 tensor [N], contiguous class ids (keys of the dataset's `id2label`),
- `is_crowd`: bool tensor [N] (panoptic and instance only).

Sources ([`load_segmentation_dataset`]):
- `"shapes"`: the built-in synthetic panoptic set (`shapes.py`).
- Hub ids and local `datasets` folders (`load_dataset` / `load_from_disk` / imagefolder with `metadata.jsonl`):
  ADE20K semantic `zhoubolei/scene_parse_150` (`image`, `annotation`; ids 1-150 become 0-149, 0 is ignored),
  Cityscapes semantic (train ids 0-18, 255 ignored), COCO-style panoptic (`image`, a panoptic PNG column,
  `segments_info`) and instance (`image`, `objects` or `annotations` with polygons/RLE) tables.
- COCO files in their original layout (`annotations/panoptic_val2017.json` + `annotations/panoptic_val2017/`
  + `val2017/`, or `annotations/instances_val2017.json` + `val2017/`), or any COCO JSON of your own.
- Cityscapes folders (`leftImg8bit/` + `gtFine/`).
- Your own semantic data: `images/` + `masks/` matched by file name, integer or RGB-coded masks, mapped by
  `classes` (which can merge values into one class and ignore values).
"""

from __future__ import annotations

import copy
import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)

TASKS = ("panoptic", "instance", "semantic")
IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

Example = dict[str, torch.Tensor]
# Cityscapes `labelIds` -> train ids (19 evaluated classes); every other id is ignored.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The dataset object
# ----------------------------------------------------------------------------------------------------------------


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

    def __getitem__(self, index: int) -> Example:
        example = _convert_task(self.decode(self.records[index]), self.source_task, self.task, self._label_map)
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
        return {**example, "masks": example["masks"][keep], "class_labels": labels[keep],
                "is_crowd": example["is_crowd"][keep]}  # fmt: skip
    # semantic: one mask per class present, crowd regions included
    classes = example["class_labels"].unique()
    masks = [example["masks"][example["class_labels"] == c].any(0) for c in classes]
    return {
        "image": example["image"],
        "masks": torch.stack(masks) if masks else example["masks"],
        "class_labels": classes,
    }


# ----------------------------------------------------------------------------------------------------------------
# Decoding annotations
# ----------------------------------------------------------------------------------------------------------------


def _open_image(value: Any) -> Image.Image:
    """PIL image from what `datasets` or a file record holds: PIL image, path, `{"bytes", "path"}` or array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"Cannot read an image from a {type(value).__name__}.")


def image_to_tensor(image: Any) -> torch.Tensor:
    """uint8 RGB tensor [3, H, W] of an image (PIL, path, `datasets` dict or array)."""
    array = np.asarray(_open_image(image).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _annotation_array(value: Any) -> np.ndarray:
    """Raw values of an annotation image: [H, W] for integer (incl. palette) images, [H, W, 3] for RGB ones."""
    image = _open_image(value)
    if image.mode in ("RGBA", "LA"):
        image = image.convert(image.mode[:-1])
    if image.mode not in ("1", "L", "P", "I", "I;16", "RGB"):
        raise ValueError(f"Unsupported annotation image mode {image.mode!r}; save masks as 8/16-bit or RGB PNGs.")
    return np.asarray(image).astype(np.int64)


def _check_size(image: torch.Tensor, height: int, width: int, name: str):
    if tuple(image.shape[1:]) != (height, width):
        raise ValueError(
            f"{name}: the image is {image.shape[2]}x{image.shape[1]} but its annotation is {width}x{height} "
            "(width x height); image and mask must have the same size."
        )


def panoptic_example(
    image: Any, panoptic: Any, segments_info: Any, category_to_label: Mapping[int, int], name: str = "example"
) -> Example:
    """
    Example from a COCO-style panoptic annotation: a PNG whose RGB colour encodes the segment id
    (`R + 256 G + 256² B`) and `segments_info` entries with `id`, `category_id` and optionally `iscrowd`.
    `category_to_label` maps the file's category ids to contiguous class ids.
    """
    pixels = image_to_tensor(image)
    rgb = _annotation_array(panoptic)
    if rgb.ndim != 3:
        raise ValueError(f"{name}: a panoptic annotation must be an RGB PNG, got a single-channel image.")
    _check_size(pixels, *rgb.shape[:2], name)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
    if isinstance(segments_info, Mapping):  # `datasets` may store a list of dicts as a dict of lists
        segments_info = [dict(zip(segments_info, values)) for values in zip(*segments_info.values())]
    masks, labels, crowd = [], [], []
    for segment in segments_info:
        labels.append(_label_of(segment["category_id"], category_to_label, f"{name}: segment {segment['id']}"))
        masks.append(ids == int(segment["id"]))
        crowd.append(bool(segment.get("iscrowd", 0)))
    return _example(pixels, masks, labels, crowd)


def _label_of(category_id: Any, category_to_label: Mapping[int, int], what: str) -> int:
    """Contiguous label of a COCO category id, or an error naming the annotation and the known categories."""
    category = int(category_id)
    if category not in category_to_label:
        raise ValueError(
            f"{what} has category_id {category}, which is not among the dataset's categories "
            f"{sorted(category_to_label)}; fix the annotation or pass the full category list."
        )
    return category_to_label[category]


def _example(pixels: torch.Tensor, masks: list[np.ndarray], labels: list[int], crowd: list[bool] | None) -> Example:
    height, width = pixels.shape[1:]
    example = {
        "image": pixels,
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.bool),
        "class_labels": torch.tensor(labels, dtype=torch.int64),
    }
    if crowd is not None:
        example["is_crowd"] = torch.tensor(crowd, dtype=torch.bool)
    return example


def decode_rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (5-bit groups + 48, continuation bit 0x20, sign bit 0x10;
    from the third run on, each value is stored as a difference to the run two places before)."""
    data = counts.encode() if isinstance(counts, str) else counts
    runs: list[int] = []
    position = 0
    while position < len(data):
        value, shift = 0, 0
        while True:
            chunk = data[position] - 48
            position += 1
            value |= (chunk & 0x1F) << shift
            shift += 5
            if not chunk & 0x20:
                if chunk & 0x10:
                    value -= 1 << shift
                break
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """bool [H, W] from a COCO RLE (`{"size": [H, W], "counts": str | list[int]}`, column-major, zeros first)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = decode_rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels but its size is {height}x{width}; the RLE is corrupt.")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(width, height).T.copy()


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """
    bool [H, W] union of polygons given as flat `[x0, y0, x1, y1, ...]` lists (COCO): a pixel belongs to a polygon
    when its centre lies inside it (even-odd rule).
    """
    mask = np.zeros((height, width), dtype=bool)
    centres_y = np.arange(height) + 0.5
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            continue
        x0, y0, x1, y1 = points[:, 0], points[:, 1], np.roll(points[:, 0], -1), np.roll(points[:, 1], -1)
        # Edge crossings with every row centre: half-open in y so shared vertices are counted once.
        crosses = (y0[None] <= centres_y[:, None]) != (y1[None] <= centres_y[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            x = x0 + (centres_y[:, None] - y0) * (x1 - x0) / (y1 - y0)
        x = np.where(crosses, x, np.inf)
        x.sort(axis=1)
        # Pixels c with x_in <= c + 0.5 < x_out, as +1/-1 events accumulated along each row.
        starts = np.clip(np.ceil(x[:, 0::2] - 0.5), 0, width)
        ends = np.clip(np.ceil(x[:, 1::2] - 0.5), 0, width)
        pairs = min(starts.shape[1], ends.shape[1])
        events = np.zeros((height, width + 1), dtype=np.int64)
        rows = np.repeat(np.arange(height)[:, None], pairs, axis=1)
        valid = np.isfinite(x[:, 1::2][:, :pairs])
        np.add.at(events, (rows[valid], starts[:, :pairs][valid].astype(int)), 1)
        np.add.at(events, (rows[valid], ends[:, :pairs][valid].astype(int)), -1)
        mask |= np.cumsum(events, axis=1)[:, :width] > 0
    return mask


def segmentation_to_mask(segmentation: Any, height: int, width: int, name: str = "annotation") -> np.ndarray:
    """bool [H, W] from a COCO `segmentation` field: polygon list, compressed or uncompressed RLE."""
    if isinstance(segmentation, Mapping):
        mask = rle_to_mask(segmentation)
        if mask.shape != (height, width):
            raise ValueError(f"{name}: RLE size {mask.shape} differs from the image size {(height, width)}.")
        return mask
    if isinstance(segmentation, Sequence):
        return polygons_to_mask(segmentation, height, width)
    raise ValueError(f"{name}: unsupported segmentation of type {type(segmentation).__name__}.")


def instance_example(
    image: Any, annotations: Sequence[Mapping[str, Any]], category_to_label: Mapping[int, int], name: str = "example"
) -> Example:
    """Example from COCO-style instance annotations (`segmentation`, `category_id`, optional `iscrowd`)."""
    pixels = image_to_tensor(image)
    height, width = pixels.shape[1:]
    masks, labels, crowd = [], [], []
    for annotation in annotations:
        labels.append(_label_of(annotation["category_id"], category_to_label, f"{name}: an annotation"))
        masks.append(segmentation_to_mask(annotation["segmentation"], height, width, name))
        crowd.append(bool(annotation.get("iscrowd", 0)))
    return _example(pixels, masks, labels, crowd)


class SemanticLabels:
    """
    How the raw values of semantic masks become class ids (or `IGNORE_INDEX`).

    Args:
        value_to_label (`Mapping[int, int]`):
            Raw value -> class id or `IGNORE_INDEX`. RGB colours are keyed as `R * 65536 + G * 256 + B`.
        id2label (`Mapping[int, str]`):
            Class names.
        rgb (`bool`):
            Whether the masks are RGB-coded.
        default (`int`, *optional*):
            Class of values missing from `value_to_label`; `None` makes them an error.
    """

    def __init__(self, value_to_label: Mapping[int, int], id2label: Mapping[int, str], rgb: bool = False,
                 default: int | None = None):  # fmt: skip
        self.value_to_label = dict(value_to_label)
        self.id2label = dict(id2label)
        self.rgb = rgb
        self.default = default

    @classmethod
    def shifted(cls, id2label: Mapping[int, str]) -> SemanticLabels:
        """Files store class k as k + 1 and 0 for "other" (ADE20K)."""
        return cls({0: IGNORE_INDEX, **{k + 1: k for k in id2label}}, id2label)

    @classmethod
    def identity(cls, id2label: Mapping[int, str], ignore_index: int = IGNORE_INDEX) -> SemanticLabels:
        """Files store class ids directly; `ignore_index` is void (Cityscapes train ids)."""
        return cls({ignore_index: IGNORE_INDEX, **{k: k for k in id2label}}, id2label)

    @classmethod
    def from_classes(
        cls, classes: Mapping[Any, str | None], ignore_index: int | None = IGNORE_INDEX
    ) -> SemanticLabels:
        """
        From a user mapping raw value -> class name. Values are integers, RGB triples, `"#rrggbb"` or `"r,g,b"`
        strings (JSON keys may be strings of integers). Values sharing a name merge into one class; a name of `None`
        ignores the value; class ids follow the order of first appearance. `ignore_index` is void unless mapped.
        """
        keys = {_parse_value(raw): name for raw, name in classes.items()}
        kinds = {kind for kind, _ in keys}
        if len(kinds) > 1:
            raise ValueError("`classes` mixes integer and RGB keys; use one kind, matching your masks.")
        names = list(dict.fromkeys(name for name in keys.values() if name is not None))
        label_of = {name: k for k, name in enumerate(names)}
        mapping = {value: IGNORE_INDEX if name is None else label_of[name] for (_, value), name in keys.items()}
        rgb = kinds == {"rgb"}
        if ignore_index is not None and not rgb:
            mapping.setdefault(ignore_index, IGNORE_INDEX)
        return cls(mapping, dict(enumerate(names)), rgb=rgb)

    def __call__(self, raw: np.ndarray, name: str = "mask") -> np.ndarray:
        """int64 class map [H, W] (IGNORE_INDEX for void) of a raw annotation array."""
        if raw.ndim == 3 and not self.rgb:
            if not ((raw == raw[..., :1]).all()):
                raise ValueError(
                    f"{name} is an RGB-coded mask but the class mapping has integer values; "
                    "give `classes` RGB keys such as (128, 64, 128) or '#804080'."
                )
            raw = raw[..., 0]
        elif raw.ndim == 2 and self.rgb:
            raise ValueError(f"{name} is a single-channel mask but `classes` has RGB keys; give integer keys.")
        codes = raw[..., 0] * 65536 + raw[..., 1] * 256 + raw[..., 2] if self.rgb else raw
        values, inverse = np.unique(codes, return_inverse=True)
        labels = np.array([self.value_to_label.get(int(v), -1 if self.default is None else self.default)
                           for v in values], dtype=np.int64)  # fmt: skip
        if (labels < 0).any():
            unknown = [_format_value(int(v), self.rgb) for v in values[labels < 0]]
            raise ValueError(
                f"{name} contains unknown class value(s) {', '.join(unknown[:10])}; add them to `classes` "
                "(with a class name, or None to ignore them)."
            )
        return labels[inverse].reshape(codes.shape)


def _parse_value(raw: Any) -> tuple[str, int]:
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("#") and len(text) == 7:
            return "rgb", int(text[1:], 16)
        if "," in text:
            raw = [int(part) for part in text.strip("()[] ").split(",")]
        elif text.lstrip("-").isdigit():
            return "int", int(text)
        else:
            raise ValueError(f"Cannot read the mask value {raw!r} in `classes`; use 3, (128, 64, 128) or '#804080'.")
    if isinstance(raw, Sequence) and len(raw) == 3:
        r, g, b = (int(v) for v in raw)
        return "rgb", r * 65536 + g * 256 + b
    if isinstance(raw, (int, np.integer)):
        return "int", int(raw)
    raise ValueError(f"Cannot read the mask value {raw!r} in `classes`; use 3, (128, 64, 128) or '#804080'.")


def _format_value(value: int, rgb: bool) -> str:
    return f"({value >> 16}, {(value >> 8) & 255}, {value & 255})" if rgb else str(value)


def semantic_example(image: Any, annotation: Any, labels: SemanticLabels, name: str = "example") -> Example:
    """Example from an image and its semantic mask: one mask per class present, void pixels in none."""
    pixels = image_to_tensor(image)
    raw = _annotation_array(annotation)
    _check_size(pixels, *raw.shape[:2], name)
    class_map = labels(raw, name)
    classes = [c for c in np.unique(class_map) if c != IGNORE_INDEX]
    return _example(pixels, [class_map == c for c in classes], classes, None)


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def _labels_for(dataset_key: str) -> dict[int, str]:
    from ..configuration.labels import id2label

    return id2label(dataset_key)


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


def _semantic_labels_for_key(dataset_key: str) -> SemanticLabels:
    id2label = _labels_for(dataset_key)
    return SemanticLabels.shifted(id2label) if dataset_key.startswith("ade20k") else SemanticLabels.identity(id2label)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _categories(categories: Sequence[Mapping[str, Any]]) -> tuple[dict[int, int], dict[int, str], list[int]]:
    """COCO `categories` -> (category id -> contiguous id, id2label, stuff ids), in the file's order."""
    category_to_label = {int(c["id"]): k for k, c in enumerate(categories)}
    id2label = {k: str(c["name"]) for k, c in enumerate(categories)}
    stuff = [k for k, c in enumerate(categories) if "isthing" in c and not c["isthing"]]
    return category_to_label, id2label, stuff


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
    data = _read_json(json_path)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_path} is not a COCO annotation file: it has no {key!r} list.")
    panoptic = bool(data["annotations"]) and "segments_info" in data["annotations"][0]
    source_task = "panoptic" if panoptic else "instance"
    category_to_label, id2label, stuff = _categories(data["categories"])
    images = {image["id"]: image for image in data["images"]}
    if not images:
        raise ValueError(f"{json_path} lists no images.")
    here, stem = json_path.parent, json_path.stem
    split_folder = f"{split}2017"
    first = next(iter(images.values()))["file_name"]
    image_root = _find_folder(
        [Path(image_dir)] if image_dir else [here / "images", here.parent / split_folder, here / split_folder,
                                             here.parent / "images", here],
        first, "image", "image_dir",
    )  # fmt: skip
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
            data["annotations"][0]["file_name"], "panoptic PNG", "mask_dir",
        )  # fmt: skip
        missing = [a["file_name"] for a in data["annotations"] if not (mask_root / a["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} panoptic PNG(s) are not in {mask_root}: {missing[:5]}")
        records = [(image_root / images[a["image_id"]]["file_name"], mask_root / a["file_name"], a["segments_info"])
                   for a in data["annotations"]]  # fmt: skip
        decode = partial(_decode_panoptic_record, category_to_label=category_to_label)
    else:
        by_image: dict[Any, list] = {image_id: [] for image_id in images}
        for annotation in data["annotations"]:
            if annotation["image_id"] not in by_image:
                raise ValueError(f"{json_path}: an annotation refers to unknown image id {annotation['image_id']}.")
            by_image[annotation["image_id"]].append(annotation)
        records = [(image_root / images[i]["file_name"], anns) for i, anns in by_image.items()]
        decode = partial(_decode_instance_record, category_to_label=category_to_label)
    return SegmentationDataset(records, decode, source_task=source_task, task=task or source_task, id2label=id2label,
                               stuff_ids=stuff)  # fmt: skip


def _decode_panoptic_record(record, category_to_label) -> Example:
    image_path, png_path, segments_info = record
    return panoptic_example(image_path, png_path, segments_info, category_to_label, name=str(png_path))


def _decode_instance_record(record, category_to_label) -> Example:
    image_path, annotations = record
    return instance_example(image_path, annotations, category_to_label, name=str(image_path))


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
    for what, names in (("image(s) without a mask", set(images) - set(masks)),
                        ("mask(s) without an image", set(masks) - set(images))):  # fmt: skip
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


def _scan_semantic_values(annotations: Iterable[Any], ignore_index: int | None) -> SemanticLabels:
    """Class mapping from the values found in the masks: integers as they are, RGB colours in sorted order."""
    values: set[int] = set()
    rgb = None
    for annotation in tqdm(annotations, desc="Scanning mask values (pass `classes` to skip)"):
        raw = _annotation_array(annotation)
        rgb = raw.ndim == 3 and not (raw == raw[..., :1]).all() if rgb is None else rgb
        if rgb:
            raw = raw[..., 0] * 65536 + raw[..., 1] * 256 + raw[..., 2]
        elif raw.ndim == 3:
            raw = raw[..., 0]
        values.update(int(v) for v in np.unique(raw))
    if rgb:
        return SemanticLabels.from_classes({f"#{v:06x}": f"#{v:06x}" for v in sorted(values)}, None)
    values.discard(ignore_index)
    id2label = {k: f"class_{k}" for k in range(max(values) + 1)} if values else {}
    return SemanticLabels.identity(id2label, IGNORE_INDEX if ignore_index is None else ignore_index)


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
    mask_root = Path(mask_dir) if mask_dir else _pick_split(
        next((root / n for n in ("masks", "annotations", "labels") if (root / n).is_dir()), root / "masks"), split
    )  # fmt: skip
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
        classes = _read_json(Path(classes))
    labels = (
        SemanticLabels.from_classes(classes, ignore_index)
        if classes is not None
        else _scan_semantic_values((mask for _, mask in pairs), ignore_index)
    )
    return SegmentationDataset(pairs, partial(_decode_semantic_record, labels=labels), source_task="semantic",
                               task="semantic", id2label=labels.id2label)  # fmt: skip


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
    id2label = _labels_for("cityscapes_semantic")
    labels = SemanticLabels.identity(id2label)
    if not masks:  # only raw label ids: map them to train ids
        masks = _files_by_stem(mask_root, (".png",), "_gtFine_labelIds")
        labels = SemanticLabels(CITYSCAPES_ID_TO_TRAIN_ID, id2label, default=IGNORE_INDEX)
    return SegmentationDataset(_match_pairs(images, masks, image_root, mask_root),
                               partial(_decode_semantic_record, labels=labels), source_task="semantic",
                               task="semantic", id2label=id2label)  # fmt: skip


# Columns tried, in order, when a `datasets` table does not say which column holds what.
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_SEMANTIC_COLUMNS = ("annotation", "semantic_segmentation", "segmentation", "label", "mask", "gtFine")
_PANOPTIC_COLUMNS = ("panoptic", "panoptic_image", "label", "annotation", "segmentation")


def _column(dataset, candidates: Sequence[str], what: str) -> str:
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"Cannot find the {what} column among {dataset.column_names}; expected one of {list(candidates)}."
    )


def hf_dataset(
    dataset,
    task: str,
    dataset_key: str | None = None,
    classes: Any = None,
    ignore_index: int | None = IGNORE_INDEX,
) -> SegmentationDataset:
    """
    Adapter for a `datasets.Dataset`. The schema is recognised from the columns: `image` plus `segments_info` and a
    panoptic PNG column (panoptic), `objects`/`annotations` with `segmentation` (instance), or an annotation image
    column (semantic). Classes come from `classes` (a COCO `categories` list or `{category_id: name}` for
    panoptic/instance, a value mapping for semantic), else from the table's `ClassLabel` feature, else from the
    benchmark `dataset_key` (a key of `configuration.labels`, e.g. `"ade20k_semantic"` or `"coco_panoptic"`).
    """
    image_column = _column(dataset, _IMAGE_COLUMNS, "image")
    columns = dataset.column_names
    if "segments_info" in columns:
        categories = _table_categories(dataset, classes, dataset_key, ("segments_info", "category_id"))
        category_to_label, id2label, stuff = _categories(categories)
        decode = partial(_decode_panoptic_row, image_column=image_column,
                         panoptic_column=_column(dataset, _PANOPTIC_COLUMNS, "panoptic PNG"),
                         category_to_label=category_to_label)  # fmt: skip
        return SegmentationDataset(dataset, decode, source_task="panoptic", task=task, id2label=id2label,
                                   stuff_ids=stuff)  # fmt: skip
    objects = next((c for c in ("objects", "annotations") if c in columns), None)
    if objects is not None:
        category_field = "category_id" if "category_id" in _field_names(dataset.features[objects]) else "category"
        categories = _table_categories(dataset, classes, dataset_key, (objects, category_field))
        category_to_label, id2label, _ = _categories(categories)
        decode = partial(_decode_instance_row, image_column=image_column, objects_column=objects,
                         category_field=category_field, category_to_label=category_to_label)  # fmt: skip
        return SegmentationDataset(dataset, decode, source_task="instance", task=task, id2label=id2label)
    annotation_column = _column(dataset, _SEMANTIC_COLUMNS, "semantic annotation")
    if classes is not None:
        labels = SemanticLabels.from_classes(classes, ignore_index)
    elif dataset_key is not None:
        labels = _semantic_labels_for_key(dataset_key)
    else:
        labels = _scan_semantic_values(
            (row[annotation_column] for row in dataset.select_columns(annotation_column)), ignore_index
        )
    decode = partial(_decode_semantic_row, image_column=image_column, annotation_column=annotation_column,
                     labels=labels)  # fmt: skip
    return SegmentationDataset(dataset, decode, source_task="semantic", task=task, id2label=labels.id2label)


def _field_names(feature) -> list[str]:
    """Names of the fields of a struct feature, also when wrapped in a list/sequence."""
    inner = getattr(feature, "feature", feature)
    return list(inner) if isinstance(inner, Mapping) else []


def _table_categories(dataset, classes, dataset_key, path: tuple[str, str]) -> list[dict[str, Any]]:
    if classes is not None:
        if isinstance(classes, (str, os.PathLike)):
            classes = _read_json(Path(classes))
        if isinstance(classes, Mapping):
            return [{"id": int(k), "name": v} for k, v in classes.items()]
        return list(classes)
    inner = getattr(dataset.features[path[0]], "feature", dataset.features[path[0]])
    feature = inner.get(path[1]) if isinstance(inner, Mapping) else None
    feature = getattr(feature, "feature", feature)  # dict-of-lists layout wraps the ClassLabel
    names = getattr(feature, "names", None)
    from ..configuration.labels import stuff_ids

    if names:
        categories = [{"id": k, "name": n} for k, n in enumerate(names)]
        stuff = {_labels_for(dataset_key)[k] for k in stuff_ids(dataset_key)} if dataset_key is not None else set()
        if stuff:  # a ClassLabel says nothing of things and stuff: the benchmark's stuff classes, by name
            if not stuff & set(names):
                logger.warning(f"No class of the table is a {dataset_key} stuff class by name; all are things.")
            for category in categories:
                category["isthing"] = category["name"] not in stuff
        return categories
    if dataset_key is not None:
        stuff = set(stuff_ids(dataset_key))
        return [{"id": k, "name": n, "isthing": k not in stuff} for k, n in _labels_for(dataset_key).items()]
    raise ValueError(
        "The table does not name its categories; pass `classes=` (a COCO `categories` list with `id`, `name` and, "
        "for panoptic, `isthing`, or a {category_id: name} mapping)."
    )


def _decode_panoptic_row(row, image_column, panoptic_column, category_to_label) -> Example:
    return panoptic_example(row[image_column], row[panoptic_column], row["segments_info"], category_to_label,
                            name=_row_name(row, image_column))  # fmt: skip


def _decode_instance_row(row, image_column, objects_column, category_field, category_to_label) -> Example:
    objects = row[objects_column]
    if isinstance(objects, Mapping):
        objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
    annotations = [{**o, "category_id": o[category_field]} for o in objects]
    return instance_example(row[image_column], annotations, category_to_label, name=_row_name(row, image_column))


def _decode_semantic_row(row, image_column, annotation_column, labels) -> Example:
    return semantic_example(row[image_column], row[annotation_column], labels, name=_row_name(row, image_column))


def _row_name(row, image_column) -> str:
    image = row[image_column]
    path = getattr(image, "filename", None) or (image.get("path") if isinstance(image, Mapping) else None)
    return str(path) if path else "a dataset row"


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


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
        from .shapes import shapes_dataset

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
    import datasets

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
    import datasets

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
    if (
        task == "semantic"
        and (path / "images").is_dir()
        and any((path / name).is_dir() for name in ("masks", "annotations", "labels"))
    ):
        return semantic_folder_dataset(path, split, classes, ignore_index, image_dir, mask_dir)
    return None
