"""EoMT outputs → semantic, panoptic and instance segmentations (vectorised torch).

Masks are upsampled the way the model input was built (to the canvas, padding cropped, then to the original size),
but only for the queries that can still produce a segment, and a bounded number at a time, so a 3000×1500 image
costs a few hundred MB instead of `num_queries` full-size maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

# Elements of a float32 chunk of upsampled maps (64 MB); a few temporaries of this size exist at once.
CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class Placement:
    """Where one model input lies in its resized image: `canvas[:height, :width]` (the model input, padded to
    `canvas`) covers rows `top:top + height` and columns `left:left + width` of resized image `image_index`."""

    image_index: int
    top: int
    left: int
    height: int
    width: int
    canvas: tuple[int, int]


def upsample_masks(mask_logits: torch.Tensor, placement: Placement, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits `(n, h, w)` of one model input → `(n, *size)`: to the canvas, padding cropped, then to `size`."""
    canvas = F.interpolate(mask_logits[None].float(), size=placement.canvas, mode="bilinear", align_corners=False)
    content = canvas[:, :, : placement.height, : placement.width]
    return F.interpolate(content, size=size, mode="bilinear", align_corners=False)[0]


def semantic_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    placements: Sequence[Placement],
    resized_sizes: Sequence[tuple[int, int]],
    target_sizes: Sequence[tuple[int, int]],
    return_segmentation_scores: bool = False,
) -> list:
    """Per-pixel class maps; see `EomtImageProcessor.post_process_semantic_segmentation`."""
    class_probs = class_logits.float().softmax(-1)[..., :-1]
    num_classes = class_probs.shape[-1]
    device = mask_logits.device
    inputs_of_image = [[n for n, p in enumerate(placements) if p.image_index == i] for i in range(len(resized_sizes))]
    results = []
    for (height, width), size, inputs in zip(resized_sizes, target_sizes, inputs_of_image):
        if len(inputs) == 1:  # a padded image: its canvas without the padding
            (index,) = inputs
            averaged = _class_scores(class_probs[index], mask_logits[index], placements[index].canvas)
            averaged = averaged[:, :height, :width]
        else:  # windows: average where they overlap
            total = torch.zeros(num_classes, height, width, device=device)
            count = torch.zeros(height, width, device=device)
            for index in inputs:
                placement = placements[index]
                scores = _class_scores(class_probs[index], mask_logits[index], placement.canvas)
                rows = slice(placement.top, placement.top + placement.height)
                cols = slice(placement.left, placement.left + placement.width)
                total[:, rows, cols] += scores[:, : placement.height, : placement.width]
                count[rows, cols] += 1
            averaged = total / count.clamp(min=1)
        if return_segmentation_scores:
            scores = F.interpolate(averaged[None], size=size, mode="bilinear", align_corners=False)[0]
            results.append(
                SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": scores.argmax(0), "segmentation_scores": scores}
                )
            )
        else:
            results.append(_resized_argmax(averaged, size))
    return results


def _class_scores(class_probs: torch.Tensor, mask_logits: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """`einsum(softmax classes, sigmoid masks)` at the canvas size, `(num_classes, *canvas)`; queries in chunks,
    accumulated inside the matrix product."""
    num_queries, num_classes = class_probs.shape
    total = torch.zeros(num_classes, canvas[0] * canvas[1], device=mask_logits.device)
    step = _chunk(num_queries, canvas[0] * canvas[1])
    for start in range(0, num_queries, step):
        masks = F.interpolate(mask_logits[None, start : start + step].float(), size=canvas, mode="bilinear")[0]
        total.addmm_(class_probs[start : start + step].T, masks.flatten(1).sigmoid_())
    return total.view(num_classes, *canvas)


def _resized_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`argmax` over classes of `scores` resized to `size`, without holding all resized classes at once."""
    best_value = best_class = None
    step = _chunk(scores.shape[0], size[0] * size[1])
    for start in range(0, scores.shape[0], step):
        resized = F.interpolate(scores[None, start : start + step], size=size, mode="bilinear", align_corners=False)[0]
        value, index = _first_max(resized)
        if best_value is None:
            best_value, best_class = value, index + start
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_class = torch.where(better, index + start, best_class)
    return best_class


def panoptic_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    placements: Sequence[Placement],
    resized_sizes: Sequence[tuple[int, int]],
    target_sizes: Sequence[tuple[int, int]],
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    stuff_classes: Iterable[int] | None = None,
) -> list[dict]:
    """Non-overlapping segments; see `EomtImageProcessor.post_process_panoptic_segmentation`."""
    probs = class_logits.float().softmax(-1)
    scores, labels = probs.max(-1)
    no_object = probs.shape[-1] - 1
    stuff = set(stuff_classes or ())
    results = []
    for index, placement in enumerate(placements):
        size = target_sizes[index]
        kept = ((labels[index] != no_object) & (scores[index] > threshold)).nonzero()[:, 0]
        segmentation = torch.full(size, -1, dtype=torch.long, device=mask_logits.device)
        if kept.numel() == 0:
            results.append({"segmentation": segmentation, "segments_info": []})
            continue
        kept_scores, kept_labels = scores[index, kept], labels[index, kept]

        # Running per-pixel winner of score × mask probability over chunks of kept queries (first index wins ties).
        best_value = best_query = best_prob = None
        mask_areas = []
        step = _chunk(kept.numel(), size[0] * size[1])
        for start in range(0, kept.numel(), step):
            mask_probs = upsample_masks(mask_logits[index, kept[start : start + step]], placement, size).sigmoid_()
            mask_areas.append(torch.count_nonzero(mask_probs >= mask_threshold, dim=(1, 2)))
            value, query = _first_max(kept_scores[start : start + step, None, None] * mask_probs)
            prob = mask_probs.gather(0, query[None])[0]
            if best_value is None:
                best_value, best_query, best_prob = value, query + start, prob
            else:
                better = value > best_value
                best_value = torch.where(better, value, best_value)
                best_query = torch.where(better, query + start, best_query)
                best_prob = torch.where(better, prob, best_prob)

        inside = best_prob >= mask_threshold
        won_area = torch.bincount(best_query.flatten(), minlength=kept.numel())
        kept_area = torch.bincount(best_query[inside], minlength=kept.numel())
        mask_area = torch.cat(mask_areas)
        valid = (won_area > 0) & (mask_area > 0) & (kept_area > 0)
        # float32 ratio compared in float64, as `tensor.item() > threshold` does.
        ratio = (won_area / mask_area.clamp(min=1)).double()
        valid &= ratio > overlap_mask_area_threshold

        segment_of_query = torch.full((kept.numel(),), -1, dtype=torch.long, device=mask_logits.device)
        segments, stuff_segment = [], {}
        for query in valid.nonzero()[:, 0].tolist():
            label = int(kept_labels[query])
            if label in stuff and label in stuff_segment:
                segment_of_query[query] = stuff_segment[label]
                continue
            segment_id = len(segments)
            if label in stuff:
                stuff_segment[label] = segment_id
            segment_of_query[query] = segment_id
            segments.append({"id": segment_id, "label_id": label, "score": round(float(kept_scores[query]), 6)})
        segmentation = torch.where(inside, segment_of_query[best_query], segmentation)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def instance_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    placements: Sequence[Placement],
    resized_sizes: Sequence[tuple[int, int]],
    target_sizes: Sequence[tuple[int, int]],
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    top_k: int | None = None,
    return_binary_maps: bool = False,
) -> list[dict]:
    """Possibly overlapping instances; see `EomtImageProcessor.post_process_instance_segmentation`."""
    probs = class_logits.float().softmax(-1)[..., :-1]
    num_classes = probs.shape[-1]
    # mask probability > mask_threshold ⇔ logit > logit(mask_threshold) (0 at the default 0.5)
    logit_threshold = torch.logit(torch.tensor(float(mask_threshold), dtype=torch.float64)).item()
    results = []
    for index, placement in enumerate(placements):
        size = target_sizes[index]
        if top_k is None:
            class_scores, classes = probs[index].max(-1)
            queries = torch.arange(class_scores.numel(), device=probs.device)
        else:
            class_scores, pairs = probs[index].flatten().topk(min(top_k, probs[index].numel()))
            queries, classes = pairs // num_classes, pairs % num_classes
        # score = class score × mean mask probability ≤ class score: other candidates cannot reach the threshold.
        candidates = (class_scores * (1 + 1e-6) >= threshold).nonzero()[:, 0]

        segmentation = torch.full(size, -1, dtype=torch.long, device=mask_logits.device)
        binary_maps, segments = [], []
        step = _chunk(candidates.numel(), size[0] * size[1])
        for start in range(0, candidates.numel(), step):
            chunk = candidates[start : start + step]
            logits = upsample_masks(mask_logits[index, queries[chunk]], placement, size)
            masks = (logits > logit_threshold).float()
            mask_scores = (logits.sigmoid().flatten(1) * masks.flatten(1)).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
            final_scores = class_scores[chunk] * mask_scores
            keep = (masks.flatten(1).amax(1) > 0) & (final_scores >= threshold)
            masks, final_scores, chunk_classes = masks[keep].bool(), final_scores[keep], classes[chunk][keep]
            if masks.shape[0] == 0:
                continue
            ids = torch.arange(len(segments), len(segments) + masks.shape[0], device=masks.device)
            # Later instances are drawn over earlier ones: the highest id covering a pixel wins.
            top = torch.where(masks, ids[:, None, None].int() + 1, 0).amax(0) - 1
            segmentation = torch.where(top >= 0, top.long(), segmentation)
            if return_binary_maps:
                binary_maps.append(masks)
            segments += [
                {"id": int(i), "label_id": int(c), "score": round(float(s), 6)}
                for i, c, s in zip(ids, chunk_classes, final_scores)
            ]
        if return_binary_maps:
            segmentation = torch.cat(binary_maps) if binary_maps else torch.zeros((0, *size), dtype=torch.bool)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def segments_from_semantic(
    segmentation: torch.Tensor, scores: torch.Tensor, return_binary_maps: bool = False
) -> dict:
    """One segment per class of a semantic map; its score is the class's mean share of the per-pixel scores."""
    labels = torch.unique(segmentation)
    segment_of_class = torch.full((scores.shape[0],), -1, dtype=torch.long, device=segmentation.device)
    segment_of_class[labels] = torch.arange(labels.numel(), device=segmentation.device)
    segment_ids = segment_of_class[segmentation]
    share = scores.gather(0, segmentation[None])[0] / scores.sum(0).clamp(min=1e-12)
    area = torch.bincount(segment_ids.flatten(), minlength=labels.numel())
    mean_share = torch.bincount(segment_ids.flatten(), weights=share.flatten(), minlength=labels.numel()) / area
    segments = [
        {"id": i, "label_id": int(label), "score": round(float(s), 6)}
        for i, (label, s) in enumerate(zip(labels, mean_share))
    ]
    if return_binary_maps:
        segment_ids = segment_ids[None] == torch.arange(labels.numel(), device=segment_ids.device)[:, None, None]
    return {"segmentation": segment_ids, "segments_info": segments}


def _first_max(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over dim 0 and the first index reaching it (`argmax` semantics)."""
    index = values.argmax(0)
    return values.gather(0, index[None])[0], index


def _chunk(count: int, pixels: int) -> int:
    return max(1, min(count, CHUNK_ELEMENTS // max(pixels, 1)))
