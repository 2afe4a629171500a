"""Fast exact semantic post-processing: the labels, scores and segments of `post_processing.semantic_*` (its
reference, same signatures) without ever holding the scores of all queries or classes at full size.

Scores are built at the resized image's size a band of rows at a time: the band's sigmoid mask maps are laid out
pixel-major (pixels × queries), so the class contraction is one float32 matrix product on data still in the cache.
When only labels are asked for, most classes are proven unable to win and skipped (`_pruned_argmax`); resizing to
the target size runs a band of rows at a time too. Labels equal the reference's except at float32 near-ties
(sums in another order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

from .geometry import Layout, Placement
from .post_processing import CHUNK_ELEMENTS

# Elements (pixels × queries) of a band of sigmoid masks (16 MB): the band is reused from the interpolation through
# the sigmoid to the class contraction. Halving it cost ~10 % CPU and, with sleeping OpenMP threads
# (OMP_WAIT_POLICY=PASSIVE), ~20 % wall time in thread wake-ups at the benchmark's 480×640 target.
BAND_ELEMENTS = 2**22
# `_pruned_argmax` contracts everywhere the classes whose probability norm over the queries reaches this fraction of
# the largest, the others only where they might win. It sets the speed only, never the labels.
CANDIDATE_FRACTION = 0.1
# Below this best score a pixel is always checked against every class (see `_unsure`).
TINY_SCORE = 1e-12


def semantic_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    layout: Layout,
    return_segmentation_scores: bool = False,
    band_elements: int = BAND_ELEMENTS,
    candidate_fraction: float = CANDIDATE_FRACTION,
) -> list:
    """`post_processing.semantic_segmentation`: labels by `_pruned_argmax`, scores a band of rows at a time.
    `band_elements` (pixels × queries of a band of sigmoid masks) and `candidate_fraction` (see `_pruned_argmax`) set
    the speed and memory, never the result."""
    results = []
    for image, size in _images(class_logits, mask_logits, layout, band_elements):
        if not return_segmentation_scores:
            results.append(_pruned_argmax(image, size, candidate_fraction))
            continue
        scores = _stitched_scores(image)
        if tuple(size) != (image.height, image.width):  # resizing to the same size is an exact copy
            scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
        results.append(
            SemanticSegmentationPostProcessorOutput(
                data={"segmentation": scores.argmax(0), "segmentation_scores": scores}
            )
        )
    return results


def semantic_segments(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    layout: Layout,
    return_binary_maps: bool = False,
    band_elements: int = BAND_ELEMENTS,
    candidate_fraction: float = CANDIDATE_FRACTION,
) -> list[dict]:
    """`post_processing.semantic_segments`. The scores of all classes exist only at the resized image's size; at the
    target size, a band of rows at a time (a 3000×1500 target would need 2.7 GB for 150 classes)."""
    results = []
    for image, size in _images(class_logits, mask_logits, layout, band_elements):
        # The labels of `semantic_segmentation` to the tie (an argmax of the banded scores below could differ from
        # them at float ties), at the price of a second pass over the sigmoid masks.
        labels = _pruned_argmax(image, size, candidate_fraction)
        results.append(_segments(labels, _stitched_scores(image), return_binary_maps))
    return results


@dataclass(frozen=True)
class _Window:
    """One model input of an image: its placement, class probabilities `(queries, classes)`, mask logits as a
    channels-last `(1, queries, h, w)` float tensor, and the bilinear weights `(placement.height, h)` from mask rows
    to the canvas rows that show image content."""

    placement: Placement
    class_probs: torch.Tensor
    mask_logits: torch.Tensor
    row_weights: torch.Tensor

    @classmethod
    def build(cls, placement: Placement, class_probs: torch.Tensor, mask_logits: torch.Tensor) -> _Window:
        logits = mask_logits[None].float().contiguous(memory_format=torch.channels_last)
        rows = _interpolation_weights(logits.shape[2], placement.canvas[0], placement.height).to(logits.device)
        return cls(placement, class_probs, logits, rows)


@dataclass(frozen=True)
class _Image:
    """One resized image of `height × width`, its windows, and the rows of a band of sigmoid masks."""

    windows: list[_Window]
    height: int
    width: int
    band_rows: int


def _images(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, layout: Layout, band_elements: int
) -> Iterator[tuple[_Image, tuple[int, int]]]:
    """Per image: its `_Image` and its target size."""
    class_probs = class_logits.float().softmax(-1)[..., :-1]
    for index, ((height, width), size) in enumerate(zip(layout.resized_sizes, layout.target_sizes)):
        inputs = layout.inputs_of(index)
        windows = [_Window.build(layout.placements[n], class_probs[n], mask_logits[n]) for n in inputs]
        band_rows = max(1, band_elements // (width * class_probs.shape[1]))
        yield _Image(windows, height, width, band_rows), size


def _segments(labels: torch.Tensor, scores: torch.Tensor, return_binary_maps: bool) -> dict:
    """`segments_from_semantic(labels, shares)`, `shares` each pixel's share of its label in the sum of the class
    scores (`scores` `(classes, h, w)` bilinearly resized to `labels.shape`), a band of rows at a time: `labels` become
    segment ids in place, and no full-size shares or ids are made (share sums in float64, so scores agree with the
    reference's float32 sums to their rounding)."""
    present = torch.zeros(scores.shape[0], dtype=torch.bool, device=labels.device)
    for rows in _row_bands(labels):
        present[labels[rows].unique()] = True
    classes = present.nonzero()[:, 0]
    segment_of_class = torch.full((scores.shape[0],), -1, dtype=torch.long, device=labels.device)
    segment_of_class[classes] = torch.arange(classes.numel(), device=labels.device)
    area = torch.zeros(classes.numel(), dtype=torch.long, device=labels.device)
    share_sum = torch.zeros(classes.numel(), dtype=torch.float64, device=labels.device)
    for rows, resized in _resized_bands(scores, tuple(labels.shape)):
        shares = resized.gather(0, labels[None, rows])[0] / resized.sum(0).clamp(min=1e-12)
        ids = segment_of_class[labels[rows]].flatten()
        area += torch.bincount(ids, minlength=classes.numel())
        share_sum += torch.bincount(ids, weights=shares.flatten().double(), minlength=classes.numel())
        labels[rows] = ids.view(-1, labels.shape[1])
    mean_share = (share_sum / area).float()
    segments = [
        {"id": i, "label_id": int(label), "score": round(float(s), 6)}
        for i, (label, s) in enumerate(zip(classes, mean_share))
    ]
    if return_binary_maps:
        maps = torch.empty((classes.numel(), *labels.shape), dtype=torch.bool, device=labels.device)
        for rows in _row_bands(labels):
            maps[:, rows] = labels[None, rows] == torch.arange(classes.numel(), device=labels.device)[:, None, None]
        return {"segmentation": maps, "segments_info": segments}
    return {"segmentation": labels, "segments_info": segments}


def _row_bands(labels: torch.Tensor) -> Iterator[slice]:
    step = _chunk(labels.shape[0], labels.shape[1])
    return (slice(top, top + step) for top in range(0, labels.shape[0], step))


@dataclass(frozen=True)
class _Piece:
    """The part of a window inside a band: its band rows, image columns and sigmoid masks `(pixels, queries)`."""

    window: _Window
    rows: slice
    cols: slice
    sigmoid: torch.Tensor


def _interpolation_taps(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`F.interpolate(mode="bilinear", align_corners=False)` along one axis: output `i` is `(1 - frac[i]) · x[low[i]] +
    frac[i] · x[high[i]]`, from the same float32 source coordinates `(i + 0.5) · in / out - 0.5`, clamped at 0."""
    scale = torch.tensor(size_in, dtype=torch.float32) / size_out
    source = ((torch.arange(size_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    low = source.long().clamp(max=size_in - 1)
    return low, (low + 1).clamp(max=size_in - 1), source - low


def _interpolation_weights(size_in: int, size_out: int, stop: int) -> torch.Tensor:
    """`(stop, size_in)` matrix of `_interpolation_taps` for the first `stop` outputs."""
    low, high, frac = (t[:stop] for t in _interpolation_taps(size_in, size_out))
    weights = torch.zeros(stop, size_in)
    rows = torch.arange(stop)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


def _sigmoid_bands(image: _Image, needed_rows: torch.Tensor | None = None) -> Iterator[tuple[slice, list[_Piece]]]:
    """Bands of `image.band_rows` rows of the resized image, each with the sigmoid masks of the windows covering it
    (valid until the next band); only the bands with a row in `needed_rows` (a boolean mask), if given.

    Bilinear interpolation is separable: columns by `F.interpolate` (rows kept as they are, which is exact), then
    rows by a product with `_Window.row_weights`, which lays the band out pixel-major and skips padding rows."""
    windows, height, width, band = image.windows, image.height, image.width, image.band_rows
    num_queries = windows[0].class_probs.shape[0]
    # One buffer per window for its band's masks, reused band after band (a band's masks are only read before the
    # next band is made): writing into a fresh multi-MB tensor per band (allocation and first touch) made the
    # product ~2.5× slower.
    buffers = [window.class_probs.new_empty(band * width * num_queries) for window in windows]
    for start in range(0, height, band):
        stop = min(height, start + band)
        if needed_rows is not None and not bool(needed_rows[start:stop].any()):
            continue
        pieces = []
        for window, buffer in zip(windows, buffers):
            placement = window.placement
            first, last = max(start, placement.top), min(stop, placement.top + placement.height)
            if first >= last:
                continue
            weights = window.row_weights[first - placement.top : last - placement.top]
            used = _used_rows(weights)
            logits = window.mask_logits[:, :, used]
            columns = F.interpolate(
                logits, size=(logits.shape[2], placement.canvas[1]), mode="bilinear", align_corners=False
            )
            columns = columns.permute(0, 2, 3, 1)[0, :, : placement.width]  # (mask rows, content columns, queries)
            maps = buffer[: weights.shape[0] * columns.shape[1] * num_queries].view(weights.shape[0], -1)
            torch.mm(weights[:, used], columns.reshape(logits.shape[2], -1), out=maps)
            maps = maps.view(-1, num_queries).sigmoid_()
            cols = slice(placement.left, placement.left + placement.width)
            pieces.append(_Piece(window, slice(first - start, last - start), cols, maps))
        yield slice(start, stop), pieces


def _average(
    pieces: Sequence[_Piece],
    band_shape: tuple[int, int],
    per_piece: Callable[[torch.Tensor, _Window], torch.Tensor],
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`per_piece(sigmoid masks, window)` `(pixels of the piece, k)` averaged over the windows covering each pixel:
    `(band pixels, k)` in row-major order, or `(len(pixels), k)` for the given band pixels only."""
    if len(pieces) == 1:  # windows cover the image, so this one covers the whole band: nothing to average
        maps = pieces[0].sigmoid
        return per_piece(maps if pixels is None else maps[pixels], pieces[0].window)
    device = pieces[0].sigmoid.device
    band_pixels = torch.arange(band_shape[0] * band_shape[1], device=device).view(band_shape)
    rows = band_pixels.numel() if pixels is None else pixels.numel()
    if pixels is not None:  # band pixel → row of the result, -1 when not asked for
        position = torch.full((band_pixels.numel(),), -1, device=device)
        position[pixels] = torch.arange(rows, device=device)
    total = count = None
    for piece in pieces:
        index, maps = band_pixels[piece.rows, piece.cols].flatten(), piece.sigmoid
        if pixels is not None:
            index = position[index]
            inside = index >= 0
            index, maps = index[inside], maps[inside]
        values = per_piece(maps, piece.window)
        if total is None:
            total, count = values.new_zeros(rows, values.shape[1]), values.new_zeros(rows, 1)
        total.index_add_(0, index, values)
        count.index_add_(0, index, values.new_ones(index.numel(), 1))
    return total / count.clamp(min=1)


def _stitched_scores(image: _Image) -> torch.Tensor:
    """`einsum(softmax classes, sigmoid masks)` of every window, averaged where windows overlap: `(classes, height,
    width)` at the resized image's size."""
    windows, height, width = image.windows, image.height, image.width
    scores = torch.empty(windows[0].class_probs.shape[1], height, width, device=windows[0].class_probs.device)
    for rows, pieces in _sigmoid_bands(image):
        band = _average(pieces, (rows.stop - rows.start, width), _class_scores)
        scores[:, rows] = band.T.view(-1, rows.stop - rows.start, width)  # a contiguous copy, see `_class_scores`
    return scores


def _scores_at(image: _Image, pixels: torch.Tensor) -> torch.Tensor:
    """`_stitched_scores` at some flat pixels of the resized image only: `(len(pixels), classes)`."""
    windows, height, width = image.windows, image.height, image.width
    needed_rows = torch.zeros(height, dtype=torch.bool, device=pixels.device)
    needed_rows[pixels // width] = True
    scores = windows[0].class_probs.new_empty(pixels.numel(), windows[0].class_probs.shape[1])
    for rows, pieces in _sigmoid_bands(image, needed_rows):
        inside = (pixels >= rows.start * width) & (pixels < rows.stop * width)
        band_pixels = pixels[inside] - rows.start * width
        scores[inside] = _average(pieces, (rows.stop - rows.start, width), _class_scores, band_pixels)
    return scores


def _class_scores(maps: torch.Tensor, window: _Window) -> torch.Tensor:
    """Scores of all classes `(pixels, classes)` from sigmoid masks `(pixels, queries)`, computed class-major: MKL's
    faster layout for many classes, and its transpose is contiguous."""
    return (window.class_probs.T @ maps.T).T


def _pruned_argmax(image: _Image, size: tuple[int, int], candidate_fraction: float) -> torch.Tensor:
    """`_stitched_scores(...)` resized to `size`, `argmax(0)`: contracting everywhere only the candidate classes
    (those some query gives a large probability) and the other classes only at the pixels where they might win.

    By Cauchy–Schwarz a class `c` scores `mean_w <p_wc, s_w> <= max_w |p_wc| · mean_w |s_w|` at a pixel (`p_wc` its
    probabilities over the queries of window `w`, `s_w` the sigmoid masks of `w` there). Where that bound for the
    largest non-candidate `max_w |p_wc|`, with a margin for float32 rounding, is below the best candidate score, no
    other class can win or tie; elsewhere the other classes are contracted too. Bilinear resizing takes weighted means
    with non-negative weights, so resized bounds still bound the resized scores (`_resized_pruned_argmax`)."""
    windows, height, width = image.windows, image.height, image.width
    class_probs = torch.stack([window.class_probs for window in windows])  # (windows, queries, classes)
    # float64: squares of probabilities below ~1e-19 vanish in float32, which would bound such a class by 0.
    norms = torch.linalg.vector_norm(class_probs.double(), dim=1).amax(0)
    is_candidate = norms >= candidate_fraction * norms.max()
    candidates, others = is_candidate.nonzero()[:, 0], (~is_candidate).nonzero()[:, 0]
    # float32 sums of n non-negative terms (over queries, then windows) are within n·eps/2 of the exact sum, relative;
    # the bound and the scores compared to it take a few such sums.
    margin = 1 + 4 * (class_probs.shape[1] + class_probs.shape[0]) * torch.finfo(torch.float32).eps
    bound_factor = float(norms[others].max()) * margin if others.numel() else 0.0
    # Class columns reordered once, candidates first, so that each band reads them as views.
    order, num_candidates = torch.cat([candidates, others]), candidates.numel()
    reordered = [replace(window, class_probs=window.class_probs[:, order]) for window in windows]

    def candidate_scores(maps: torch.Tensor, window: _Window) -> torch.Tensor:
        scores = maps.new_empty(maps.shape[0], num_candidates + 1)
        torch.mm(maps, window.class_probs[:, :num_candidates], out=scores[:, :-1])
        torch.linalg.vector_norm(maps, dim=1, out=scores[:, -1])
        return scores

    def other_scores(maps: torch.Tensor, window: _Window) -> torch.Tensor:
        return maps @ window.class_probs[:, num_candidates:]

    resize = tuple(size) != (height, width)
    # Labels here, or to resize: the candidates' scores and, last, an upper bound of the other classes' scores (their
    # exact maximum where they were contracted).
    labels = None if resize else torch.empty(height, width, dtype=torch.long, device=class_probs.device)
    maps = class_probs.new_empty(candidates.numel() + 1, height, width) if resize else None
    for rows, pieces in _sigmoid_bands(replace(image, windows=reordered)):
        band_shape = (rows.stop - rows.start, width)
        scores = _average(pieces, band_shape, candidate_scores)
        best, index = scores[:, :-1].max(1)
        band_labels = candidates[index]
        others_bound = scores[:, -1].mul_(bound_factor)
        unsure = _unsure(others_bound, best).nonzero()[:, 0] if others.numel() else index[:0]
        if unsure.numel():
            rest = _average(pieces, band_shape, other_scores, unsure)
            full = scores.new_empty(unsure.numel(), class_probs.shape[2])
            full[:, candidates], full[:, others] = scores[unsure, :-1], rest
            band_labels[unsure] = full.argmax(1)
            others_bound[unsure] = rest.amax(1) * margin
        if resize:
            maps[:, rows] = scores.T.view(-1, *band_shape)
        else:
            labels[rows] = band_labels.view(band_shape)
    if not resize:
        return labels
    return _resized_pruned_argmax(maps, candidates, size, partial(_scores_at, image))


def _unsure(others_bound: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Pixels where another class might win: its bound reaches the best candidate, or the scores are so small that
    float32 squares and products underflow, where the rounding margin no longer holds."""
    return (others_bound >= best) | (best < TINY_SCORE)


def _resized_pruned_argmax(
    maps: torch.Tensor,
    candidates: torch.Tensor,
    size: tuple[int, int],
    scores_at: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Labels at `size` from `maps` at the resized image's size (the candidates' scores, then an upper bound of the
    other classes' scores), resized a band of rows at a time. Where the resized bound reaches the best resized
    candidate, all classes are resized from their scores at the source pixels (`scores_at(flat pixels)`)."""
    labels = torch.empty(size, dtype=torch.long, device=maps.device)
    unsure = torch.empty(size, dtype=torch.bool, device=maps.device)
    for rows, resized in _resized_bands(maps, size):
        best, index = resized[:-1].max(0)
        labels[rows], unsure[rows] = candidates[index], _unsure(resized[-1], best)
    points = unsure.nonzero()
    if points.numel():
        labels[points[:, 0], points[:, 1]] = _resized_argmax_at(points, maps.shape[1:], size, scores_at)
    return labels


def _resized_argmax_at(
    points: torch.Tensor,
    source_size: tuple[int, int],
    size: tuple[int, int],
    scores_at: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Best class at `points` `(n, 2)` of `size`, all classes' scores resized bilinearly from `source_size`: each point
    from the scores at its (at most four) source pixels, weighted as `F.interpolate` weighs them."""
    height, width = source_size
    row_low, row_high, row_frac = (t.to(points.device)[points[:, 0]] for t in _interpolation_taps(height, size[0]))
    col_low, col_high, col_frac = (t.to(points.device)[points[:, 1]] for t in _interpolation_taps(width, size[1]))
    corners = torch.stack(
        [
            row_low * width + col_low,
            row_low * width + col_high,
            row_high * width + col_low,
            row_high * width + col_high,
        ]
    )
    pixels, corner_index = corners.unique(return_inverse=True)
    scores = scores_at(pixels)
    labels = []
    step = _chunk(points.shape[0], 4 * scores.shape[1])
    for start in range(0, points.shape[0], step):
        chunk = slice(start, start + step)
        corner_scores = scores[corner_index[:, chunk]]  # (4, points, classes)
        col, row = col_frac[chunk, None], row_frac[chunk, None]
        top = corner_scores[0] * (1 - col) + corner_scores[1] * col
        bottom = corner_scores[2] * (1 - col) + corner_scores[3] * col
        labels.append((top * (1 - row) + bottom * row).argmax(1))
    return torch.cat(labels)


def _resized_bands(maps: torch.Tensor, size: tuple[int, int]) -> Iterator[tuple[slice, torch.Tensor]]:
    """`maps` `(k, h, w)` bilinearly resized to `size` (an exact copy at their own size), a band of at most
    `CHUNK_ELEMENTS` elements at a time: `(rows, (k, rows of the band, size[1]))`."""
    resize = tuple(size) != tuple(maps.shape[1:])
    row_weights = _interpolation_weights(maps.shape[1], size[0], size[0]).to(maps.device) if resize else None
    band = _chunk(size[0], maps.shape[0] * size[1])
    for start in range(0, size[0], band):
        rows = slice(start, min(size[0], start + band))
        yield rows, _resize_rows(maps, row_weights[rows], size[1]) if resize else maps[:, rows]


def _resize_rows(maps: torch.Tensor, row_weights: torch.Tensor, width: int) -> torch.Tensor:
    """Bilinear resize of `maps` `(k, h, w)` to the rows whose weights `(rows, h)` are given and to `width` columns:
    rows by a matrix product, then columns by `F.interpolate` (rows kept as they are, which is exact)."""
    used = _used_rows(row_weights)
    rows = torch.matmul(row_weights[:, used], maps[:, used])
    return F.interpolate(rows[None], size=(rows.shape[1], width), mode="bilinear", align_corners=False)[0]


def _used_rows(weights: torch.Tensor) -> slice:
    """The input rows that interpolation `weights` `(outputs, inputs)` read: bilinear taps are adjacent."""
    used = weights.sum(0).nonzero()[:, 0]
    return slice(int(used[0]), int(used[-1]) + 1)


def _chunk(count: int, elements_each: int) -> int:
    """How many of `count` items of `elements_each` elements fit in `CHUNK_ELEMENTS` (at least one)."""
    return max(1, min(count, CHUNK_ELEMENTS // max(elements_each, 1)))
