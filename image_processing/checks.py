"""Checks of post-processing arguments against the model outputs, in one place and before any work: the outputs
(the model's, or a mapping of numpy arrays from a runtime such as onnxruntime), the target sizes against the number
of images behind them, and the option values. Each error names the argument and what was expected."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

# Options of the three post-processings. Each accepts (and ignores) the others' so that one set of options, such as
# the pipeline's, can go to any of them; anything else is a mistake worth an error.
POST_PROCESSING_OPTIONS = {
    "threshold", "mask_threshold", "overlap_mask_area_threshold", "stuff_classes", "top_k", "return_binary_maps",
    "return_segmentation_scores",
}  # fmt: skip


def _check_options(unused: dict[str, Any], options: dict[str, Any]) -> None:
    """Unknown option names are a `TypeError`; option values of the wrong type or range are errors too, whether
    the post-processing uses them or not."""
    unknown = sorted(set(unused) - POST_PROCESSING_OPTIONS)
    if unknown:
        raise TypeError(
            f"Post-processing got unknown option(s) {unknown}; options: target_sizes, size, "
            f"{', '.join(sorted(POST_PROCESSING_OPTIONS))}."
        )
    values = {**unused, **options}
    for name in ("threshold", "mask_threshold", "overlap_mask_area_threshold"):
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`{name}` must be a number between 0 and 1, got {value!r} ({type(value).__name__}).")
        if not 0 <= value <= 1:
            raise ValueError(f"`{name}` must be between 0 and 1, got {value!r}.")
    top_k = values.get("top_k")
    if top_k is not None and not positive_int(top_k):
        raise ValueError(f"`top_k` must be a positive integer (or None for each query's best class), got {top_k!r}.")
    stuff = values.get("stuff_classes")
    if stuff is not None and (
        isinstance(stuff, (str, bytes)) or not all(isinstance(c, numbers.Integral) for c in _iterable(stuff))
    ):
        raise TypeError(f"`stuff_classes` must be class ids (integers), got {stuff!r}.")


def _iterable(value) -> Iterable:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    try:
        return list(value)
    except TypeError:
        return [value]


def _model_outputs(outputs) -> tuple[torch.Tensor, torch.Tensor, Sequence | None]:
    """The class and mask logits of `outputs` as checked tensors, and its `patch_offsets`. `outputs` is the model's
    output or a mapping of its fields, with tensors or numpy arrays (e.g. onnxruntime's outputs by name)."""
    class_logits, mask_logits = _field(outputs, "class_queries_logits"), _field(outputs, "masks_queries_logits")
    if class_logits is None or mask_logits is None:
        raise TypeError(
            "`outputs` must carry `class_queries_logits` and `masks_queries_logits`: pass the model's output or a dict "
            f"of them by name (tensors or numpy arrays, e.g. from onnxruntime); got {type(outputs).__name__}."
        )
    class_logits, mask_logits = torch.as_tensor(class_logits), torch.as_tensor(mask_logits)
    if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            "Expected `class_queries_logits` (inputs, queries, classes + 1) and `masks_queries_logits` (inputs, "
            f"queries, height, width), got shapes {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}."
        )
    for name, logits in (("class_queries_logits", class_logits), ("masks_queries_logits", mask_logits)):
        finite = logits.isfinite().flatten(1).all(1)
        if not bool(finite.all()):
            raise ValueError(
                f"`{name}` has NaN or infinite values (model input {int((~finite).nonzero()[0, 0])}): the forward pass "
                "overflowed or got bad pixel values; check `pixel_values` and the model's dtype."
            )
    return class_logits, mask_logits, _field(outputs, "patch_offsets")


def _num_images(patch_offsets: Sequence | None, num_inputs: int) -> int:
    """Images behind `num_inputs` model inputs: one each, or as many as `patch_offsets` (one per input) name."""
    if patch_offsets is None or len(patch_offsets) == 0:
        return num_inputs
    if len(patch_offsets) != num_inputs:
        raise ValueError(
            f"Got {len(patch_offsets)} `patch_offsets` for {num_inputs} model inputs; pass the `patch_offsets` the "
            "processor returned with these inputs."
        )
    return max(int(offset[0]) for offset in patch_offsets) + 1


def _target_sizes(target_sizes, num_images: int) -> list[tuple[int, int]]:
    """`target_sizes` as one `(height, width)` pair of positive integers per image."""
    if target_sizes is None:
        raise ValueError("`target_sizes` is required: the original (height, width) of each image.")
    if isinstance(target_sizes, (torch.Tensor, np.ndarray)):
        target_sizes = target_sizes.tolist()
    if len(target_sizes) == 2 and all(isinstance(v, numbers.Number) for v in target_sizes):
        raise ValueError(
            f"`target_sizes` takes one (height, width) per image, got the bare pair {tuple(target_sizes)}; wrap it in "
            f"a list: [{tuple(target_sizes)}]."
        )
    sizes = []
    for size in target_sizes:
        if isinstance(size, (torch.Tensor, np.ndarray)):
            size = size.tolist()
        pair = list(size) if isinstance(size, Sequence) else []
        if len(pair) != 2 or not all(isinstance(v, numbers.Real) and v == int(v) and v > 0 for v in pair):
            raise ValueError(f"Each target size must be a (height, width) pair of positive integers, got {size!r}.")
        sizes.append((int(pair[0]), int(pair[1])))
    if len(sizes) != num_images:
        raise ValueError(
            f"Got {len(sizes)} target sizes for {num_images} image(s) in the outputs; pass one (height, width) per "
            "image."
        )
    return sizes


def has_windows(outputs) -> bool:
    patch_offsets = _field(outputs, "patch_offsets")
    return patch_offsets is not None and len(patch_offsets) > 0


def _field(outputs, name: str):
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def checked_arguments(
    outputs, target_sizes, unused: dict[str, Any], options: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, Sequence | None, list[tuple[int, int]]]:
    """Class logits, mask logits, `patch_offsets` and target sizes of a post-processing call, checked; `options` are
    the ones the post-processing uses, `unused` the other tasks' it accepts (checked too)."""
    _check_options(unused, options)
    class_logits, mask_logits, patch_offsets = _model_outputs(outputs)
    sizes = _target_sizes(target_sizes, _num_images(patch_offsets, class_logits.shape[0]))
    return class_logits, mask_logits, patch_offsets, sizes
