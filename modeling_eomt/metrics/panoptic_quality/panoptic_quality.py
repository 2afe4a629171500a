"""Panoptic quality (PQ), with segmentation quality (SQ), recognition quality (RQ) and the things/stuff split.

Follows the COCO panoptic evaluation (panopticapi): a predicted and a ground-truth segment of the same class match
when their IoU exceeds 0.5, where pixels that are void in the ground truth are left out of the union. Unmatched
ground-truth segments are false negatives, unmatched predictions false positives, except predictions lying more
than half on void or crowd pixels (of their class), which are ignored. Crowd segments are never matched.
Per class, `PQ = sum(IoU of matches) / (TP + FP/2 + FN/2) = SQ * RQ`; classes with TP + FP + FN = 0 are left out of
the averages.

Load it offline with `evaluate.load("<path to this folder>")` or `modeling_eomt.metrics.load_metric("panoptic_quality")`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    segment_index_map,
)

_DESCRIPTION = __doc__

_CITATION = """\
@inproceedings{kirillov2019panoptic,
  title={Panoptic Segmentation},
  author={Kirillov, Alexander and He, Kaiming and Girshick, Ross and Rother, Carsten and Doll{\\'a}r, Piotr},
  booktitle={CVPR},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[dict]`): one dict per image, either what `post_process_panoptic_segmentation` returns,
        `{"segmentation": (H, W) int map of segment ids, "segments_info": [{"id": int, "label_id": int, ...}]}`
        (pixels whose id is not listed, e.g. -1, are unassigned), or `{"masks": (N, H, W) bool, "labels": (N,)}`
        (overlaps: the later mask wins).
    references (`list[dict]`): the ground truth in either form; segments may be crowd regions (`"iscrowd": 1` in a
        segment dict, or an `"iscrowd"`/`"is_crowd"` (N,) array in the masks form). Pixels of no segment are void.
    stuff_classes (`list[int]`, *optional*): label ids of the stuff classes; when given, the results also hold the
        `_things` and `_stuff` averages (every other class is a thing).
    per_category (`bool`, defaults to `False`): also return `per_category`, `{label_id: {pq, sq, rq, tp, fp, fn}}`.
    num_labels (`int`, *optional*): when given, label ids must be below it.
Returns:
    `pq`, `sq`, `rq` (fractions in [0, 1]) and `n` (number of classes averaged); with `stuff_classes` also
    `pq_things`, `sq_things`, `rq_things`, `n_things`, `pq_stuff`, `sq_stuff`, `rq_stuff`, `n_stuff`. An average over
    no class is NaN.
Example:
    >>> from modeling_eomt.metrics import load_metric
    >>> pq = load_metric("panoptic_quality")
    >>> target = {"segmentation": [[0, 0], [1, 1]], "segments_info": [{"id": 0, "label_id": 3}, {"id": 1, "label_id": 5}]}
    >>> pred = {"segmentation": [[7, 7], [7, 7]], "segments_info": [{"id": 7, "label_id": 3, "score": 0.9}]}
    >>> pq.compute(predictions=[pred], references=[target])["pq"]
    0.0
"""

_STORED = {
    "index_map": RUNS_FEATURE,
    "labels": datasets.List(datasets.Value("int64")),
    "iscrowd": datasets.List(datasets.Value("int64")),
}


def encode_panoptic(example: Mapping[str, Any], what: str) -> dict:
    """One image as stored: a map of segment indices (-1 = void) plus each segment's label and crowd flag."""
    index_map, infos = segment_index_map(example, what)
    return {
        "index_map": encode_runs(index_map),
        "labels": [info["label_id"] for info in infos],
        "iscrowd": [info["iscrowd"] for info in infos],
    }


def panoptic_stats(prediction: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[int, np.ndarray]:
    """Per class `[TP, FP, FN, sum of matched IoUs]` of one image, both given as [`encode_panoptic`] returns."""
    pred_map, gt_map = decode_runs(prediction["index_map"]), decode_runs(reference["index_map"])
    if pred_map.shape != gt_map.shape:
        raise ValueError(
            f"A prediction of size {pred_map.shape} was paired with a reference of size {gt_map.shape}; resize the "
            "prediction to the reference size (post-processing's `target_sizes`)."
        )
    pred_labels, gt_labels = np.asarray(prediction["labels"], np.int64), np.asarray(reference["labels"], np.int64)
    gt_crowd = np.asarray(reference["iscrowd"], bool)
    num_pred, num_gt = len(pred_labels), len(gt_labels)
    # Joint histogram of (gt segment, pred segment), the last row/column collecting void/unassigned pixels.
    gt_index = np.where(gt_map < 0, num_gt, gt_map).reshape(-1)
    pred_index = np.where(pred_map < 0, num_pred, pred_map).reshape(-1)
    joint = np.bincount(gt_index * (num_pred + 1) + pred_index, minlength=(num_gt + 1) * (num_pred + 1))
    joint = joint.reshape(num_gt + 1, num_pred + 1)
    intersection, void_overlap = joint[:num_gt, :num_pred], joint[num_gt, :num_pred]
    pred_area, gt_area = joint[:, :num_pred].sum(0), joint[:num_gt, :].sum(1)
    pred_present, gt_present = pred_area > 0, gt_area > 0  # listed segments without pixels do not exist

    union = pred_area[None] + gt_area[:, None] - intersection - void_overlap[None]
    comparable = (gt_labels[:, None] == pred_labels[None]) & ~gt_crowd[:, None]
    iou = np.where(comparable & (union > 0), intersection / np.maximum(union, 1), 0.0)
    matched = iou > 0.5  # at most one match per row and column, as segments do not overlap

    stats: dict[int, np.ndarray] = {}

    def add(label: int, column: int, value: float) -> None:
        stats.setdefault(int(label), np.zeros(4))[column] += value

    for gt, pred in zip(*np.nonzero(matched)):
        add(gt_labels[gt], 0, 1)
        add(gt_labels[gt], 3, iou[gt, pred])
    for gt in np.flatnonzero(gt_present & ~gt_crowd & ~matched.any(1)):
        add(gt_labels[gt], 2, 1)
    same_class_crowd = (gt_labels[:, None] == pred_labels[None]) & gt_crowd[:, None]
    crowd_overlap = (intersection * same_class_crowd).sum(0)
    for pred in np.flatnonzero(pred_present & ~matched.any(0)):
        if (void_overlap[pred] + crowd_overlap[pred]) / pred_area[pred] > 0.5:
            continue
        add(pred_labels[pred], 1, 1)
    return stats


def panoptic_quality_from_stats(
    stats: Mapping[int, np.ndarray], stuff_classes: Iterable[int] | None = None, per_category: bool = False
) -> dict[str, Any]:
    """Averages PQ/SQ/RQ over classes from summed [`panoptic_stats`]."""
    per_class = {}
    for label, (tp, fp, fn, iou_sum) in sorted(stats.items()):
        if tp + fp + fn == 0:
            continue
        denominator = tp + 0.5 * fp + 0.5 * fn
        per_class[label] = {
            "pq": float(iou_sum / denominator),
            "sq": float(iou_sum / tp) if tp else 0.0,
            "rq": float(tp / denominator),
            "tp": int(tp),
            "fp": int(fp),
            "fn": int(fn),
        }
    groups = {"": list(per_class)}
    if stuff_classes is not None:
        stuff = {int(label) for label in stuff_classes}
        groups["_things"] = [label for label in per_class if label not in stuff]
        groups["_stuff"] = [label for label in per_class if label in stuff]
    results: dict[str, Any] = {}
    for suffix, labels in groups.items():
        for key in ("pq", "sq", "rq"):
            values = [per_class[label][key] for label in labels]
            results[key + suffix] = float(np.mean(values)) if values else float("nan")
        results["n" + suffix] = len(labels)
    if per_category:
        results["per_category"] = per_class
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PanopticQuality(EncodedInputsMixin, evaluate.Metric):
    encode_example = staticmethod(encode_panoptic)

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, _STORED, ["https://github.com/cocodataset/panopticapi"]
        )

    def _compute(self, predictions, references, stuff_classes=None, per_category=False, num_labels=None):
        check_labels(predictions, num_labels)
        check_labels(references, num_labels)
        totals: dict[int, np.ndarray] = {}
        for prediction, reference in zip(predictions, references):
            for label, values in panoptic_stats(prediction, reference).items():
                totals[label] = totals.get(label, 0) + values
        return panoptic_quality_from_stats(totals, stuff_classes, per_category)
