"""COCO-style mask average precision (AP), computing what pycocotools' `COCOeval(iouType="segm")` computes.

Per image and class the detections, sorted by score and capped at 100, are matched greedily to the ground truth at
each IoU threshold 0.50:0.05:0.95 (crowd regions may absorb several detections, with IoU = intersection / detection
area; ground truth that is crowd or outside the area range is "ignored": detections matched to it count neither way).
Precision is made monotone and sampled at 101 recall points; AP averages it over thresholds, recall points and
classes that have ground truth. Areas: small < 32², medium 32²–96², large > 96² pixels. Values are fractions in
[0, 1]; -1 means undefined (no ground truth in that range), as in pycocotools.

Load it offline with `evaluate.load("<path to this folder>")` or `modeling_eomt.metrics.load_metric("mask_ap")`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import evaluate
import numpy as np

from modeling_eomt.metrics.encoding import (
    RUNS_FEATURE,
    EncodedInputsMixin,
    check_labels,
    decode_runs,
    encode_runs,
    metric_info,
    segments_from_example,
)

_DESCRIPTION = __doc__

_CITATION = """\
@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and Ramanan, Deva
    and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={ECCV},
  year={2014}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[dict]`): one dict per image, either `{"masks": (N, H, W) bool, "scores": (N,), "labels": (N,)}`
        or what `post_process_instance_segmentation` returns: with `return_binary_maps=True`, `{"segmentation":
        (N, H, W) bool, "segments_info": [{"id", "label_id", "score"}]}` (map i is segment i); without it an (H, W) id
        map, which cannot represent overlapping instances, so prefer the binary maps.
    references (`list[dict]`): the ground truth of each image in any of these forms; optional crowd flags (`"iscrowd"`
        or `"is_crowd"`, per mask or per segment) and areas (`"areas"` per mask / `"area"` per segment: the area used
        for the small/medium/large split, e.g. COCO's annotation area; defaults to the mask's pixel count).
    per_category (`bool`, defaults to `False`): also return `per_category`, `{label_id: AP}`.
    num_labels (`int`, *optional*): when given, label ids must be below it.
Returns:
    `map` (AP@[.50:.95]), `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_1`, `mar_10`, `mar_100`,
    `mar_small`, `mar_medium`, `mar_large` -- pycocotools' 12 summary numbers in its order.
Example:
    >>> import numpy as np
    >>> from modeling_eomt.metrics import load_metric
    >>> mask_ap = load_metric("mask_ap")
    >>> masks = np.zeros((1, 8, 8), bool); masks[0, 2:6, 2:6] = True
    >>> mask_ap.compute(predictions=[{"masks": masks, "scores": [0.9], "labels": [1]}],
    ...                 references=[{"masks": masks, "labels": [1]}])["map"]  # 1 up to pycocotools' epsilon
    0.9999999999999998
"""

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
AREA_RANGES = ((0.0, 1e10), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e10))  # all, small, medium, large
MAX_DETECTIONS = (1, 10, 100)

_STORED = {
    "masks": RUNS_FEATURE,
    "labels": datasets.List(datasets.Value("int64")),
    "scores": datasets.List(datasets.Value("float64")),
    "iscrowd": datasets.List(datasets.Value("int64")),
    "areas": datasets.List(datasets.Value("float64")),
}


def encode_instances(example: Mapping[str, Any], what: str) -> dict:
    """One image as stored: the mask stack run-length encoded plus per-mask label, score, crowd flag and area."""
    masks, infos = segments_from_example(example, what)
    return {
        "masks": encode_runs(masks.astype(np.uint8)),
        "labels": [info["label_id"] for info in infos],
        "scores": [info["score"] for info in infos],
        "iscrowd": [info["iscrowd"] for info in infos],
        "areas": [info["area"] for info in infos],
    }


@dataclass
class ImageClassEval:
    """Matching of one class in one image: detections sorted by score, per area range and IoU threshold."""

    scores: np.ndarray  # (D,)
    matched: np.ndarray  # (A, T, D) bool
    ignored: np.ndarray  # (A, T, D) bool
    num_gt: np.ndarray  # (A,) ground truth that is not ignored


def mask_ious(dt_masks: np.ndarray, gt_masks: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoUs of flattened masks; for crowd ground truth the union is the detection's area."""
    # float32 matmul counts exactly up to 2**24 pixels per mask
    dtype = np.float32 if dt_masks.shape[1] < 2**24 else np.float64
    intersection = (dt_masks.astype(dtype) @ gt_masks.astype(dtype).T).astype(np.float64)
    dt_area, gt_area = dt_masks.sum(1, dtype=np.float64), gt_masks.sum(1, dtype=np.float64)
    union = np.where(gt_crowd[None], dt_area[:, None], dt_area[:, None] + gt_area[None] - intersection)
    return np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0)


def greedy_match(ious: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """
    COCO matching of score-sorted detections (rows) to ground truth (columns, not-ignored first) at each IoU
    threshold: each detection takes the free ground truth of highest IoU (ties: the later one), preferring
    not-ignored ground truth; crowd ground truth stays free. Returns (matched, matched-to-ignored), each (T, D).
    """
    num_dt = ious.shape[0]
    matched = np.zeros((len(IOU_THRESHOLDS), num_dt), bool)
    ignored = np.zeros_like(matched)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(ious.shape[1], bool)
        for d in range(num_dt):
            eligible = (~taken | gt_crowd) & (ious[d] >= min(threshold, 1 - 1e-10))
            for group in (~gt_ignore, gt_ignore):
                candidates = np.flatnonzero(eligible & group)
                if len(candidates):
                    values = ious[d, candidates]
                    best = candidates[len(values) - 1 - np.argmax(values[::-1])]
                    matched[t, d], ignored[t, d], taken[best] = True, gt_ignore[best], True
                    break
    return matched, ignored


def evaluate_image(
    prediction: Mapping[str, Any], reference: Mapping[str, Any], max_detections: int = MAX_DETECTIONS[-1]
) -> dict[int, ImageClassEval]:
    """Per-class matching of one image, both given as [`encode_instances`] returns."""
    dt_masks = decode_runs(prediction["masks"], np.uint8)
    gt_masks = decode_runs(reference["masks"], np.uint8)
    if dt_masks.shape[1:] != gt_masks.shape[1:]:
        raise ValueError(
            f"Predicted masks of size {dt_masks.shape[1:]} were paired with reference masks of size "
            f"{gt_masks.shape[1:]}; resize the predictions to the reference size (post-processing's `target_sizes`)."
        )
    pixels = int(np.prod(gt_masks.shape[1:]))
    dt_masks, gt_masks = dt_masks.reshape(len(dt_masks), pixels), gt_masks.reshape(len(gt_masks), pixels)
    dt_labels, gt_labels = np.asarray(prediction["labels"], np.int64), np.asarray(reference["labels"], np.int64)
    dt_scores = np.asarray(prediction["scores"], np.float64)
    gt_crowd = np.asarray(reference["iscrowd"], bool)
    given_areas = np.asarray(reference["areas"], np.float64)
    gt_areas = np.where(given_areas >= 0, given_areas, gt_masks.sum(1, dtype=np.float64))

    results = {}
    for label in np.union1d(dt_labels, gt_labels):
        dts = np.flatnonzero(dt_labels == label)
        dts = dts[np.argsort(-dt_scores[dts], kind="mergesort")][:max_detections]
        gts = np.flatnonzero(gt_labels == label)
        ious = mask_ious(dt_masks[dts], gt_masks[gts], gt_crowd[gts])
        dt_areas = dt_masks[dts].sum(1, dtype=np.float64)
        matched, ignored, num_gt = [], [], []
        for low, high in AREA_RANGES:
            gt_ignore = gt_crowd[gts] | (gt_areas[gts] < low) | (gt_areas[gts] > high)
            order = np.argsort(gt_ignore, kind="mergesort")
            range_matched, range_ignored = greedy_match(ious[:, order], gt_ignore[order], gt_crowd[gts][order])
            # unmatched detections outside the area range do not count as false positives
            outside = (dt_areas < low) | (dt_areas > high)
            matched.append(range_matched)
            ignored.append(range_ignored | (~range_matched & outside[None]))
            num_gt.append(int((~gt_ignore).sum()))
        results[int(label)] = ImageClassEval(dt_scores[dts], np.stack(matched), np.stack(ignored), np.array(num_gt))
    return results


def accumulate(image_evals: Sequence[Mapping[int, ImageClassEval]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """
    Precision (T, R, K, A, M) and recall (T, K, A, M) over classes K, area ranges A and detection caps M;
    -1 where a class has no ground truth in the area range.
    """
    labels = sorted({label for evals in image_evals for label in evals})
    num_t, num_r, num_a, num_m = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(MAX_DETECTIONS)
    precision = -np.ones((num_t, num_r, len(labels), num_a, num_m))
    recall = -np.ones((num_t, len(labels), num_a, num_m))
    for k, label in enumerate(labels):
        entries = [evals[label] for evals in image_evals if label in evals]
        for a in range(num_a):
            num_gt = sum(int(entry.num_gt[a]) for entry in entries)
            if num_gt == 0:
                continue
            for m, max_det in enumerate(MAX_DETECTIONS):
                scores = np.concatenate([entry.scores[:max_det] for entry in entries])
                order = np.argsort(-scores, kind="mergesort")
                matched = np.concatenate([entry.matched[a][:, :max_det] for entry in entries], axis=1)[:, order]
                ignored = np.concatenate([entry.ignored[a][:, :max_det] for entry in entries], axis=1)[:, order]
                tp = np.cumsum(matched & ~ignored, axis=1, dtype=np.float64)
                fp = np.cumsum(~matched & ~ignored, axis=1, dtype=np.float64)
                for t in range(num_t):
                    rc = tp[t] / num_gt
                    pr = tp[t] / (tp[t] + fp[t] + np.spacing(1))
                    recall[t, k, a, m] = rc[-1] if len(rc) else 0.0
                    pr = np.maximum.accumulate(pr[::-1])[::-1]  # the precision envelope
                    indices = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
                    sampled = np.zeros(num_r)
                    valid = indices < len(pr)
                    sampled[valid] = pr[indices[valid]]
                    precision[t, :, k, a, m] = sampled
    return labels, precision, recall


def _mean_defined(values: np.ndarray) -> float:
    values = values[values > -1]
    return float(values.mean()) if values.size else -1.0


def summarize(labels: list[int], precision: np.ndarray, recall: np.ndarray, per_category: bool = False) -> dict:
    """pycocotools' 12 summary numbers (and optionally AP per class) from [`accumulate`]."""
    all_, small, medium, large = range(len(AREA_RANGES))
    top = len(MAX_DETECTIONS) - 1
    t50, t75 = 0, 5  # IOU_THRESHOLDS[0] == 0.5, IOU_THRESHOLDS[5] == 0.75
    results = {
        "map": _mean_defined(precision[:, :, :, all_, top]),
        "map_50": _mean_defined(precision[t50, :, :, all_, top]),
        "map_75": _mean_defined(precision[t75, :, :, all_, top]),
        "map_small": _mean_defined(precision[:, :, :, small, top]),
        "map_medium": _mean_defined(precision[:, :, :, medium, top]),
        "map_large": _mean_defined(precision[:, :, :, large, top]),
        "mar_1": _mean_defined(recall[:, :, all_, 0]),
        "mar_10": _mean_defined(recall[:, :, all_, 1]),
        "mar_100": _mean_defined(recall[:, :, all_, top]),
        "mar_small": _mean_defined(recall[:, :, small, top]),
        "mar_medium": _mean_defined(recall[:, :, medium, top]),
        "mar_large": _mean_defined(recall[:, :, large, top]),
    }
    if per_category:
        results["per_category"] = {
            label: _mean_defined(precision[:, :, k, all_, top]) for k, label in enumerate(labels)
        }
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskAP(EncodedInputsMixin, evaluate.Metric):
    encode_example = staticmethod(encode_instances)

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, _STORED, ["https://github.com/cocodataset/cocoapi"]
        )

    def _compute(self, predictions, references, per_category=False, num_labels=None):
        check_labels(predictions, num_labels)
        check_labels(references, num_labels)
        image_evals = [evaluate_image(p, r) for p, r in zip(predictions, references)]
        return summarize(*accumulate(image_evals), per_category=per_category)
