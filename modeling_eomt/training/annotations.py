"""
Decoding annotations into examples of the common form (see `dataset.py`): COCO panoptic PNGs with their
`segments_info`, COCO instance annotations (polygons or RLE) and semantic masks (integer or RGB-coded, mapped to
classes by [`SemanticLabels`]).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..configuration import IGNORE_INDEX
from ..rle import rle_to_mask
from .dataset import Example, UnreadableSampleError


def _open_image(value: Any) -> Image.Image:
    """PIL image, decoded, from what `datasets` or a file record holds: PIL image, path, `{"bytes", "path"}` or array;
    [`UnreadableSampleError`] naming the file if it cannot be read."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        source, name = io.BytesIO(value["bytes"]), value.get("path") or "an image stored in the table"
    elif isinstance(value, dict):
        source = name = value["path"]
    elif isinstance(value, (str, os.PathLike)):
        source = name = value
    else:
        raise TypeError(f"Cannot read an image from a {type(value).__name__}.")
    try:
        image = Image.open(source)
        image.load()  # decode now: a truncated file fails here, where its name is known
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableSampleError(f"cannot read {name}: {error}") from error
    return image


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

    def __init__(
        self,
        value_to_label: Mapping[int, int],
        id2label: Mapping[int, str],
        rgb: bool = False,
        default: int | None = None,
    ):
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
        labels = np.array(
            [self.value_to_label.get(int(v), -1 if self.default is None else self.default) for v in values],
            dtype=np.int64,
        )
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


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def categories_of(categories: Sequence[Mapping[str, Any]]) -> tuple[dict[int, int], dict[int, str], list[int]]:
    """COCO `categories` -> (category id -> contiguous id, id2label, stuff ids), in the file's order."""
    category_to_label = {int(c["id"]): k for k, c in enumerate(categories)}
    id2label = {k: str(c["name"]) for k, c in enumerate(categories)}
    stuff = [k for k, c in enumerate(categories) if "isthing" in c and not c["isthing"]]
    return category_to_label, id2label, stuff


def scan_semantic_values(annotations: Iterable[Any], ignore_index: int | None) -> SemanticLabels:
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
