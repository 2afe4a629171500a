"""Bounded-memory panoptic and instance post-processing: the results of `post_processing.panoptic_segmentation` and
`post_processing.instance_segmentation` (their reference, same signatures), holding at the target size only the
returned map (and the returned masks with `return_binary_maps`), whatever the number of queries.

The reference keeps several full-size maps besides its result (the running winner's value, query and probability,
the upsampled chunk and its temporaries: 5.8 GB at 10000×10000). Targets of at most `chunk_elements` pixels still run
it (those maps are then a few chunks, and it is faster there); larger ones are `banded`: masks are upsampled in
pieces of about `chunk_elements` (`upsampled_bands`), and what the reference keeps per pixel lives in the int64
result itself:

- panoptic: each pixel's running winner (a piece's winner found as in the reference) as one int64 key, the float32
  bits of class score × mask probability (non-negative floats order like their bits) above the query's index reversed
  (the first query wins ties, as in the reference) and whether the pixel is inside the query's mask. The areas of the overlap test are counted from
  the keys, which then become segment ids in place.
- instance: a first pass sums each candidate's mask, a second draws the kept ones. Split into bands, a mask's
  probabilities are summed (float32) band by band and the bands' sums added (float64), not in the reference's one
  float32 reduction: scores then agree to float32 rounding (~1e-7, so the 6th decimal may differ), labels, ids and
  maps exactly (unless a score lies that close to `threshold`).

Bands are exact: torch's CPU bilinear kernel computes an output as the row weights applied to (the column weights
applied to the inputs); interpolating only the columns (rows kept: an exact copy), then only the rows of a band of
columns, gives the same floats bit for bit (tested). A band of rows would not: its first output row's source
coordinate would be computed from other integers. So the columns of a chunk of queries are upsampled at the full
target width (content rows × width, bounded by the model input's size), then its rows a band of columns at a time.
Targets where the reference's kernel would differ are not banded: outputs of at most 128 rows + columns take torch's
channels-last kernel; inputs are laid out `(queries, 1, h, w)` since 3 channels on one thread take it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import pairwise

import torch
import torch.nn.functional as F

from . import post_processing
from .geometry import Layout, Placement

# torch's bilinear CPU kernel takes its channels-last path for outputs of at most this many rows + columns.
_SMALL_OUTPUT = 128
_LOW_BITS = 2**32 - 1


def panoptic_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    layout: Layout,
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    stuff_classes: Iterable[int] | None = None,
    chunk_elements: int = post_processing.CHUNK_ELEMENTS,
) -> list[dict]:
    """`post_processing.panoptic_segmentation`; `chunk_elements` sets the memory, never the result."""
    options = {"threshold": threshold, "mask_threshold": mask_threshold, "chunk_elements": chunk_elements}
    stuff = {int(c) for c in stuff_classes} if stuff_classes is not None else set()
    results = []
    queries_of_images = post_processing.panoptic_queries(class_logits, threshold)
    for index, (kept, kept_scores, kept_labels) in enumerate(queries_of_images):
        placement, size = layout.placements[index], layout.target_sizes[index]
        if not banded(placement, size, chunk_elements):
            image = _one_image(class_logits, mask_logits, layout, index)
            results += post_processing.panoptic_segmentation(
                *image, overlap_mask_area_threshold=overlap_mask_area_threshold, stuff_classes=stuff, **options
            )
            continue
        segmentation = torch.full(size, -1, dtype=torch.long, device=mask_logits.device)
        if kept.numel() == 0:
            results.append({"segmentation": segmentation, "segments_info": []})
            continue
        count = kept.numel()
        mask_area = torch.zeros(count, dtype=torch.long, device=kept.device)
        for queries, columns, logits in upsampled_bands(mask_logits[index, kept], placement, size, chunk_elements):
            probs = logits.sigmoid_()
            mask_area[queries] += torch.count_nonzero(probs >= mask_threshold, dim=(1, 2))
            # the piece's winner as in the reference (first index wins ties), then packed
            value, query = (kept_scores[queries, None, None] * probs).max(0)
            inside = probs.gather(0, query[None])[0] >= mask_threshold
            keys = value.view(torch.int32).long().bitwise_left_shift_(32)
            keys.bitwise_or_(query.neg_().add_(count - queries.start).mul_(2)).bitwise_or_(inside)
            best = segmentation[:, columns]
            torch.maximum(best, keys, out=best)

        won_area = torch.zeros_like(mask_area)
        kept_area = torch.zeros_like(mask_area)
        for rows in _row_bands(size, chunk_elements):
            query, inside = _unpack(segmentation[rows], count)
            won_area += torch.bincount(query.flatten(), minlength=count)
            kept_area += torch.bincount(query[inside], minlength=count)
        segment_of_query, segments = post_processing.panoptic_segments(
            kept_scores, kept_labels, (won_area, kept_area, mask_area), overlap_mask_area_threshold, stuff
        )
        for rows in _row_bands(size, chunk_elements):
            query, inside = _unpack(segmentation[rows], count)
            segmentation[rows] = torch.where(inside, segment_of_query[query], -1)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def instance_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    layout: Layout,
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    top_k: int | None = None,
    return_binary_maps: bool = False,
    chunk_elements: int = post_processing.CHUNK_ELEMENTS,
) -> list[dict]:
    """`post_processing.instance_segmentation`; `chunk_elements` sets the memory (and, at targets split into bands,
    the float32 rounding of the scores; see the module's docstring)."""
    logit_threshold = post_processing.instance_logit_threshold(mask_threshold)
    options = {"threshold": threshold, "mask_threshold": mask_threshold, "chunk_elements": chunk_elements}
    results = []
    candidates = post_processing.instance_candidates(class_logits, threshold, top_k)
    for index, (class_scores, queries, classes) in enumerate(candidates):
        placement, size = layout.placements[index], layout.target_sizes[index]
        if not banded(placement, size, chunk_elements):
            image = _one_image(class_logits, mask_logits, layout, index)
            results += post_processing.instance_segmentation(
                *image, top_k=top_k, return_binary_maps=return_binary_maps, **options
            )
            continue
        candidate_logits = mask_logits[index, queries]
        area = torch.zeros(queries.numel(), dtype=torch.long, device=queries.device)
        prob_sum = torch.zeros(queries.numel(), dtype=torch.float64, device=queries.device)
        for chunk, _, logits in upsampled_bands(candidate_logits, placement, size, chunk_elements):
            masks = logits > logit_threshold
            area[chunk] += masks.sum((1, 2))
            prob_sum[chunk] += (logits.sigmoid().flatten(1) * masks.flatten(1).float()).sum(1)
        final_scores = class_scores * (prob_sum.float() / (area + 1e-6))
        keep = (area > 0) & (final_scores >= threshold)
        segments = [
            {"id": i, "label_id": int(c), "score": round(float(s), 6)}
            for i, (c, s) in enumerate(zip(classes[keep], final_scores[keep]))
        ]

        if return_binary_maps:
            segmentation = torch.zeros((len(segments), *size), dtype=torch.bool, device=mask_logits.device)
        else:
            segmentation = torch.full(size, -1, dtype=torch.long, device=mask_logits.device)
        ids = torch.arange(len(segments), device=queries.device)[:, None, None]
        for chunk, columns, logits in upsampled_bands(candidate_logits[keep], placement, size, chunk_elements):
            masks = logits > logit_threshold
            if return_binary_maps:
                segmentation[chunk, :, columns] = masks
                continue
            # Later instances are drawn over earlier ones: the highest id covering a pixel wins.
            top = torch.where(masks, ids[chunk].int() + 1, 0).amax(0) - 1
            segmentation[:, columns] = torch.where(top >= 0, top.long(), segmentation[:, columns])
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def banded(placement: Placement, size: tuple[int, int], chunk_elements: int) -> bool:
    """Whether masks of `placement` are upsampled to `size` in bands: when a map has more than `chunk_elements`
    pixels (smaller ones run the reference, whose full-size maps are then a few chunks) and no output of the bands
    takes torch's channels-last kernel, which the reference's would not."""
    height, width = size
    small = min(height + width, placement.height + width) <= _SMALL_OUTPUT
    return height * width > chunk_elements and not small


def upsampled_bands(
    mask_logits: torch.Tensor, placement: Placement, size: tuple[int, int], chunk_elements: int
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """`post_processing.upsample_masks(mask_logits, placement, size)` `(n, *size)` in pieces of about
    `chunk_elements` (for a `banded` target): `(queries, columns, logits)`, the logits `(queries, size[0], columns)`,
    chunk of queries by chunk and in each, band of columns by band."""
    count, (height, width) = mask_logits.shape[0], size
    canvas_elements = placement.canvas[0] * placement.canvas[1]
    # Bands of at least min(width, 128) columns, so that none takes the channels-last kernel.
    step = max(1, chunk_elements // max(canvas_elements, placement.height * width, height * min(width, _SMALL_OUTPUT)))
    num_bands = max(1, width // max(_SMALL_OUTPUT, chunk_elements // (step * height)))
    bounds = [width * i // num_bands for i in range(num_bands + 1)]
    for start in range(0, count, step):
        queries = slice(start, min(count, start + step))
        canvas = _bilinear(mask_logits[queries, None].float(), placement.canvas)
        columns = _bilinear(canvas[:, :, : placement.height, : placement.width], (placement.height, width))
        for left, right in pairwise(bounds):
            yield queries, slice(left, right), _bilinear(columns[..., left:right], (height, right - left))[:, 0]


def _bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _one_image(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, layout: Layout, index: int
) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """The class logits, mask logits and layout of image `index` alone (one model input per image here)."""
    placement = replace(layout.placements[index], image_index=0)
    one = Layout((placement,), (layout.resized_sizes[index],), (layout.target_sizes[index],))
    return class_logits[index : index + 1], mask_logits[index : index + 1], one


def _row_bands(size: tuple[int, int], chunk_elements: int) -> Iterator[slice]:
    step = max(1, chunk_elements // size[1])
    return (slice(top, min(size[0], top + step)) for top in range(0, size[0], step))


def _unpack(keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Winning query (index among the `count` kept ones) and whether the pixel is inside its mask, from packed keys."""
    return count - (keys & _LOW_BITS).bitwise_right_shift_(1), (keys & 1).bool()
