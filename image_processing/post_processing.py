"""EoMT outputs → panoptic, instance and semantic segmentations: the plain algorithms (vectorised torch).

Masks are upsampled the way the model input was built (to the canvas, padding cropped, then to the original size; see
`geometry`). Panoptic and instance post-processing upsample only the queries that can still produce a segment, a
bounded number at a time (`chunk_elements`), so a 3000×1500 image costs a few hundred MB instead of `num_queries`
full-size maps; they still keep a few full-size maps, which `segments_fast` (what `EomtImageProcessor` runs) does
not. The semantic functions here are the reference of `semantic_fast`, which gives the same labels in bounded memory
and is what `EomtImageProcessor` runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

from .geometry import Layout, Placement

# Elements of a float32 chunk of upsampled maps (16 MB); a few temporaries of this size exist at once. Below 32 MB,
# glibc reuses freed chunks from its heap; larger ones go back to the OS and are page-faulted in anew each time
# (64 MB chunks made panoptic and instance post-processing ~1.5× slower on CPU).
CHUNK_ELEMENTS = 2**22


def upsample_masks(mask_logits: torch.Tensor, placement: Placement, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits `(n, h, w)` of one model input → `(n, *size)`: to the canvas, padding cropped, then to `size`."""
    canvas = F.interpolate(mask_logits[None].float(), size=placement.canvas, mode="bilinear", align_corners=False)
    content = canvas[0, :, : placement.height, : placement.width]
    if tuple(size) == content.shape[1:]:  # resizing to the same size is an exact copy
        return content
    return F.interpolate(content[None], size=size, mode="bilinear", align_corners=False)[0]


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Class scores `(classes, height, width)` of each image at its target size: per model input
    `einsum(softmax(classes)[..., :-1], sigmoid(masks))` at the resized image's size, averaged where windows overlap,
    then resized."""
    class_probs = class_logits.float().softmax(-1)[..., :-1]
    results = []
    for image, (resized, size) in enumerate(zip(layout.resized_sizes, layout.target_sizes)):
        total = class_probs.new_zeros(class_probs.shape[-1], *resized)
        count = class_probs.new_zeros(1, *resized)
        for n in layout.inputs_of(image):
            placement = layout.placements[n]
            masks = upsample_masks(mask_logits[n], placement, (placement.height, placement.width)).sigmoid()
            rows = slice(placement.top, placement.top + placement.height)
            cols = slice(placement.left, placement.left + placement.width)
            total[:, rows, cols] += torch.einsum("qc,qhw->chw", class_probs[n], masks)
            count[:, rows, cols] += 1
        scores = total / count
        if tuple(size) != tuple(resized):  # resizing to the same size is an exact copy
            scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
        results.append(scores)
    return results


def semantic_segmentation(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, layout: Layout, return_segmentation_scores: bool = False
) -> list:
    """Per-pixel classes, the argmax of `semantic_scores`; see `EomtImageProcessor.post_process_semantic_segmentation`."""
    scores = semantic_scores(class_logits, mask_logits, layout)
    if return_segmentation_scores:
        return [
            SemanticSegmentationPostProcessorOutput(data={"segmentation": s.argmax(0), "segmentation_scores": s})
            for s in scores
        ]
    return [s.argmax(0) for s in scores]


def semantic_segments(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, layout: Layout, return_binary_maps: bool = False
) -> list[dict]:
    """One segment per class of `semantic_segmentation`'s labels, scored by `segments_from_semantic`; see
    `EomtImageProcessor.post_process_semantic_segments`."""
    results = []
    for scores in semantic_scores(class_logits, mask_logits, layout):
        labels = scores.argmax(0)
        shares = scores.gather(0, labels[None])[0] / scores.sum(0).clamp(min=1e-12)
        results.append(segments_from_semantic(labels, shares, return_binary_maps))
    return results


def panoptic_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    layout: Layout,
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    stuff_classes: Iterable[int] | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[dict]:
    """Non-overlapping segments; see `EomtImageProcessor.post_process_panoptic_segmentation`."""
    stuff = {int(c) for c in stuff_classes} if stuff_classes is not None else set()
    results = []
    for index, (kept, kept_scores, kept_labels) in enumerate(panoptic_queries(class_logits, threshold)):
        placement, size = layout.placements[index], layout.target_sizes[index]
        segmentation = torch.full(size, -1, dtype=torch.long, device=mask_logits.device)
        if kept.numel() == 0:
            results.append({"segmentation": segmentation, "segments_info": []})
            continue

        # Running per-pixel winner of score × mask probability over chunks of kept queries (first index wins ties).
        best_value = best_query = best_prob = None
        mask_areas = []
        step = _chunk(kept.numel(), size, chunk_elements)
        for start in range(0, kept.numel(), step):
            mask_probs = upsample_masks(mask_logits[index, kept[start : start + step]], placement, size).sigmoid_()
            mask_areas.append(torch.count_nonzero(mask_probs >= mask_threshold, dim=(1, 2)))
            value, query = (kept_scores[start : start + step, None, None] * mask_probs).max(0)
            prob = mask_probs.gather(0, query[None])[0]
            query += start
            if best_value is None:
                best_value, best_query, best_prob = value, query, prob
            else:  # in place: at large target sizes each map is tens of MB, and there is a chunk per query
                better = value > best_value
                for best, new in ((best_value, value), (best_query, query), (best_prob, prob)):
                    torch.where(better, new, best, out=best)

        inside = best_prob >= mask_threshold
        won_area = torch.bincount(best_query.flatten(), minlength=kept.numel())
        kept_area = torch.bincount(best_query[inside], minlength=kept.numel())
        segment_of_query, segments = panoptic_segments(
            kept_scores, kept_labels, (won_area, kept_area, torch.cat(mask_areas)), overlap_mask_area_threshold, stuff
        )
        segmentation = torch.where(inside, segment_of_query[best_query], segmentation)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def panoptic_queries(class_logits: torch.Tensor, threshold: float) -> list[tuple[torch.Tensor, ...]]:
    """Per model input: the queries whose best class is an object with probability above `threshold`, their
    probabilities and their classes."""
    scores, labels = class_logits.float().softmax(-1).max(-1)
    kept = (labels != class_logits.shape[-1] - 1) & (scores > threshold)
    return [(k.nonzero()[:, 0], s[k], c[k]) for k, s, c in zip(kept, scores, labels)]


def panoptic_segments(
    scores: torch.Tensor,
    labels: torch.Tensor,
    areas: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    overlap_mask_area_threshold: float,
    stuff: set[int],
) -> tuple[torch.Tensor, list[dict]]:
    """The segment id of each kept query (-1: none) and the segments, from the queries' `scores`, `labels` and
    `areas`: pixels won, pixels won inside the query's mask, mask. A query makes a segment if it won pixels inside
    its mask, more than `overlap_mask_area_threshold` of its mask; the queries of a `stuff` class make one segment."""
    won_area, kept_area, mask_area = areas
    valid = (won_area > 0) & (mask_area > 0) & (kept_area > 0)
    # float32 ratio compared in float64, as `tensor.item() > threshold` does.
    ratio = (won_area / mask_area.clamp(min=1)).double()
    valid &= ratio > overlap_mask_area_threshold

    segment_of_query = torch.full((scores.numel(),), -1, dtype=torch.long, device=scores.device)
    segments, stuff_segment = [], {}
    for query in valid.nonzero()[:, 0].tolist():
        label = int(labels[query])
        if label in stuff and label in stuff_segment:
            segment_of_query[query] = stuff_segment[label]
            continue
        segment_id = len(segments)
        if label in stuff:
            stuff_segment[label] = segment_id
        segment_of_query[query] = segment_id
        segments.append({"id": segment_id, "label_id": label, "score": round(float(scores[query]), 6)})
    return segment_of_query, segments


def instance_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    layout: Layout,
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    top_k: int | None = None,
    return_binary_maps: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[dict]:
    """Possibly overlapping instances; see `EomtImageProcessor.post_process_instance_segmentation`."""
    logit_threshold = instance_logit_threshold(mask_threshold)
    results = []
    for index, (class_scores, queries, classes) in enumerate(instance_candidates(class_logits, threshold, top_k)):
        placement, size = layout.placements[index], layout.target_sizes[index]
        segmentation = torch.full(size, -1, dtype=torch.long, device=mask_logits.device)
        binary_maps, segments = [], []
        step = _chunk(queries.numel(), size, chunk_elements)
        for start in range(0, queries.numel(), step):
            chunk = slice(start, start + step)
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


def instance_candidates(
    class_logits: torch.Tensor, threshold: float, top_k: int | None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per model input: the class probabilities, queries and classes of the instances that may reach `threshold`:
    each query's best class, or with `top_k` the `top_k` best (query, class) pairs."""
    probs = class_logits.float().softmax(-1)[..., :-1]
    num_classes = probs.shape[-1]
    results = []
    for image_probs in probs:
        if top_k is None:
            class_scores, classes = image_probs.max(-1)
            queries = torch.arange(class_scores.numel(), device=probs.device)
        else:
            class_scores, pairs = image_probs.flatten().topk(min(top_k, image_probs.numel()))
            queries, classes = pairs // num_classes, pairs % num_classes
        # score = class score × mean mask probability ≤ class score: other candidates cannot reach the threshold.
        candidates = (class_scores * (1 + 1e-6) >= threshold).nonzero()[:, 0]
        results.append((class_scores[candidates], queries[candidates], classes[candidates]))
    return results


def instance_logit_threshold(mask_threshold: float) -> float:
    """mask probability > mask_threshold ⇔ logit > logit(mask_threshold) (0 at the default 0.5)."""
    return torch.logit(torch.tensor(float(mask_threshold), dtype=torch.float64)).item()


def segments_from_semantic(segmentation: torch.Tensor, shares: torch.Tensor, return_binary_maps: bool = False) -> dict:
    """One segment per class of a semantic map; its score is the mean over its pixels of `shares`, each pixel's
    share of its class in the sum of its class scores."""
    labels = torch.unique(segmentation)
    segment_of_class = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long, device=segmentation.device)
    segment_of_class[labels] = torch.arange(labels.numel(), device=segmentation.device)
    segment_ids = segment_of_class[segmentation]
    area = torch.bincount(segment_ids.flatten(), minlength=labels.numel())
    mean_share = torch.bincount(segment_ids.flatten(), weights=shares.flatten(), minlength=labels.numel()) / area
    segments = [
        {"id": i, "label_id": int(label), "score": round(float(s), 6)}
        for i, (label, s) in enumerate(zip(labels, mean_share))
    ]
    if return_binary_maps:
        segment_ids = segment_ids[None] == torch.arange(labels.numel(), device=segment_ids.device)[:, None, None]
    return {"segmentation": segment_ids, "segments_info": segments}


def _chunk(count: int, size: tuple[int, int], chunk_elements: int) -> int:
    """How many of `count` maps of `size` fit in `chunk_elements` (at least one)."""
    return max(1, min(count, chunk_elements // max(size[0] * size[1], 1)))
