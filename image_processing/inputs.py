"""The processor's inputs in every accepted form — PIL images, numpy arrays, tensors; 8-bit, 16-bit and float;
batched or not — and its options, turned into checked tensors and values: each problem named with the image's index
and the fix. Images keep their range until normalisation (`to_chw` returns the scale it assumed)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging

from .checks import positive_int

logger = logging.get_logger(__name__)


def size_dict(size: dict[str, int | None] | int | None) -> dict[str, int | None]:
    if size is None:
        return {"shortest_edge": 640, "longest_edge": 640}
    if not isinstance(size, Mapping):
        size = {"shortest_edge": size, "longest_edge": size}
    size = dict(size)
    if "shortest_edge" not in size and {"height", "width"} <= set(size) and size["height"] == size["width"]:
        size = {"shortest_edge": size["height"], "longest_edge": size["height"]}
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if not positive_int(shortest) or not (longest is None or positive_int(longest)):
        raise ValueError(
            f"`size` must give a positive integer `shortest_edge` (and optionally `longest_edge`), got {size}; "
            'e.g. {"shortest_edge": 640, "longest_edge": 640} or 640.'
        )
    return {"shortest_edge": int(shortest), "longest_edge": None if longest is None else int(longest)}


def image_list(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("No images given.")
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


# PIL modes read as arrays of their own dtype (16-bit integers, 32-bit integers and floats); other modes go to RGB.
PIL_ARRAY_MODES = ("RGB", "L", "RGBA", "I;16", "I;16L", "I;16B", "I", "F")


def to_chw(
    image, index: int, data_format: str | None = None, warn_range: bool = True
) -> tuple[torch.Tensor, float | None]:
    """Image `index` of a call → `(3, H, W)` tensor and its value of full intensity (see `_normalize`): uint8 kept
    (the fast resize path) with 255; 16-bit integers (PNG mode "I;16", `uint16` arrays) with 65535; other integers as
    8-bit levels; floats as float32, `None` when within [0, 1], else taken as 8-bit levels (255, with a warning if
    `warn_range`)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode in PIL_ARRAY_MODES else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype.kind not in "uif":
            raise TypeError(
                f"Image {index} is a numpy array of dtype {image.dtype}; pass numbers (uint8, uint16 or float)."
            )
        image = image.astype(image.dtype.newbyteorder("="), copy=False)  # big-endian "I;16B" PNGs
        tensor = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else np.array(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach()
    else:
        raise TypeError(
            f"Unsupported image type {type(image).__name__}; pass PIL images, numpy arrays or torch tensors."
        )
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3:
        first, last = tensor.shape[0] in (1, 3, 4), tensor.shape[-1] in (1, 3, 4)
        if data_format in ("channels_last", "last") or (data_format is None and last and not first):
            tensor = tensor.permute(2, 0, 1)
        elif data_format is None and first == last:
            if not first:
                raise ValueError(
                    f"Cannot find the channel axis of image {index} of shape {tuple(tensor.shape)}: expected 1, 3 "
                    "or 4 channels first or last. For a batch of grayscale images pass a list of 2-d arrays."
                )
            tensor = tensor.permute(2, 0, 1)  # ambiguous (e.g. 3×4×3): HWC, the PIL/numpy convention
    else:
        raise ValueError(f"An image must have 2 or 3 dimensions, got shape {tuple(tensor.shape)} for image {index}.")
    channels = tensor.shape[0]
    if channels == 1:
        tensor = tensor.expand(3, -1, -1)
    elif channels == 4:
        tensor = tensor[:3]
    elif channels != 3:
        raise ValueError(f"Images need 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got {channels} for image {index}.")
    if min(tensor.shape[1:]) == 0:
        raise ValueError(f"Image {index} is empty (shape {tuple(tensor.shape)}).")
    if tensor.dtype == torch.uint8:
        return tensor, 255.0
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8) * 255, 255.0
    if tensor.is_floating_point():
        tensor = tensor.float()  # also float16/bfloat16, which CPU resizing does not take
        if not bool(tensor.isfinite().all()):
            raise ValueError(f"Image {index} has NaN or infinite pixel values; replace them before processing.")
        low, high = float(tensor.min()), float(tensor.max())
        if 0 <= low and high <= 1:
            return tensor, None
        if warn_range:
            logger.warning(
                f"Float image {index} has values in [{low:g}, {high:g}], outside [0, 1]: taken as 0-255 levels (as "
                "uint8). Pass floats in [0, 1], or `do_rescale=False` for values already on the model's scale."
            )
        return tensor, 255.0
    if tensor.is_complex():
        raise TypeError(f"Image {index} has complex values ({tensor.dtype}); pass real pixel values.")
    dtype, tensor = tensor.dtype, tensor.to(torch.int64)  # uint16 and friends have few kernels
    low, high = int(tensor.min()), int(tensor.max())
    sixteen_bit = dtype == torch.uint16 or (dtype == torch.int32 and 255 < high <= 65535)
    if not sixteen_bit and (low < 0 or high > 255):
        raise ValueError(
            f"Image {index} ({tensor.dtype}) has values in [{low}, {high}], outside the 8-bit range 0-255: pass "
            "16-bit images as uint16, others as uint8 or as floats in [0, 1]."
        )
    return tensor.float(), 65535.0 if sixteen_bit else 255.0


def channel_statistic(name: str, value) -> list[float]:
    """`image_mean`/`image_std` as one finite number per RGB channel (a single number stands for all three)."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(np.isfinite(values)) or (name == "image_std" and min(values) <= 0):
        positive = ", positive" if name == "image_std" else ""
        raise ValueError(f"`{name}` must be 3 finite{positive} numbers (one per RGB channel), got {value!r}.")
    return values


def map_list(maps, count: int) -> list:
    if isinstance(maps, (np.ndarray, torch.Tensor)) and maps.ndim == 3:
        if maps.shape[0] != count and maps.shape[-1] in (3, 4):
            raise ValueError(
                f"Got a segmentation map of shape {tuple(maps.shape)} for {count} image(s): an RGB-encoded label map? "
                "Convert it to one integer id per pixel first (COCO panoptic: R + 256·G + 256²·B)."
            )
        maps = list(maps)
    elif not isinstance(maps, (list, tuple)):
        maps = [maps]
    if len(maps) != count:
        raise ValueError(f"Got {len(maps)} segmentation maps for {count} images; pass one map per image.")
    return list(maps)


def to_label_map(label_map, index: int) -> torch.Tensor:
    if isinstance(label_map, Image.Image):
        label_map = np.array(label_map)  # a writable copy: torch warns on PIL's read-only buffer
    tensor = torch.as_tensor(np.asarray(label_map) if not isinstance(label_map, torch.Tensor) else label_map)
    if tensor.ndim == 3 and 1 in (tensor.shape[0], tensor.shape[-1]):
        tensor = tensor.squeeze(0 if tensor.shape[0] == 1 else -1)
    if tensor.ndim != 2:
        raise ValueError(
            f"A segmentation map must be a 2-d array of labels, got shape {tuple(tensor.shape)} "
            "(convert RGB-encoded ids to single integers first)."
        )
    if tensor.is_floating_point() and not bool((tensor == tensor.round()).all()):  # NaN fails too
        raise ValueError(
            f"Segmentation map {index} holds non-integer values (NaN, or fractions as in a map resized with "
            "interpolation); pass integer ids, and resize maps with nearest-neighbour."
        )
    tensor = tensor.long()
    if tensor.numel() and int(tensor.min()) < -1:
        raise ValueError(
            f"Segmentation map {index} holds the negative id {int(tensor.min())}; ids are non-negative integers "
            "(mark pixels to ignore with -1 or `ignore_index`)."
        )
    return tensor


def binary_masks(
    label_map: torch.Tensor, mapping: dict[int, int] | None, ignore_index: int | None, reduced: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label map → one float mask per label present (ascending) and its class id."""
    labels = torch.unique(label_map)
    void = [-1] if ignore_index is None else [-1, ignore_index]  # -1 fills the padding
    labels = labels[~torch.isin(labels, torch.tensor(void, device=labels.device))]
    masks = (label_map[None] == labels[:, None, None]).float()
    if mapping is None:
        return masks, labels
    shift = 1 if reduced else 0  # a reduced map holds instance id - 1, and the mapping speaks original ids
    try:
        classes = [mapping[int(label) + shift] - shift for label in labels.tolist()]
    except KeyError as error:
        raise ValueError(f"Instance id {error.args[0]} is missing from `instance_id_to_semantic_id`.") from None
    return masks, torch.tensor(classes, dtype=torch.long, device=label_map.device)
