"""Mean intersection-over-union (mIoU) for semantic segmentation.

Intersections and unions are summed over the whole dataset per class (not averaged per image). Pixels whose reference
is `ignore_index` are left out. A class that appears neither in the references nor in the predictions has no IoU
(NaN) and is left out of the mean; likewise a class absent from the references has no accuracy.

Load it offline with `evaluate.load("<path to this folder>")` or `modeling_eomt.metrics.load_metric("mean_iou")`.
"""

from __future__ import annotations

from typing import Any

import evaluate
import numpy as np

from modeling_eomt.metrics.encoding import (
    RUNS_FEATURE,
    EncodedInputsMixin,
    decode_runs,
    encode_runs,
    integer_map,
    metric_info,
)

_DESCRIPTION = __doc__

_CITATION = """\
@article{everingham2015pascal,
  title={The Pascal Visual Object Classes Challenge: A Retrospective},
  author={Everingham, Mark and Eslami, S. M. Ali and Van Gool, Luc and Williams, Christopher K. I. and Winn, John
    and Zisserman, Andrew},
  journal={IJCV},
  year={2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list`): one (H, W) map of class ids per image (numpy array, torch tensor or nested list), e.g. what
        `post_process_semantic_segmentation` returns.
    references (`list`): one (H, W) map of class ids per image; `ignore_index` marks pixels to leave out.
    num_labels (`int`): number of classes; ids run from 0 to `num_labels - 1`.
    ignore_index (`int`, defaults to 255): reference id of unlabeled pixels.
Returns:
    `mean_iou`, `mean_accuracy` (mean per-class pixel accuracy), `overall_accuracy` (fractions in [0, 1]) and
    `per_category_iou`, `per_category_accuracy` (lists of `num_labels` floats, NaN for classes without data).
Example:
    >>> from modeling_eomt.metrics import load_metric
    >>> miou = load_metric("mean_iou")
    >>> miou.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [255, 0]]], num_labels=2)["mean_iou"]
    0.5
"""


def semantic_stats(prediction: np.ndarray, reference: np.ndarray, num_labels: int, ignore_index: int) -> np.ndarray:
    """`[intersection, predicted area, reference area]` per class (shape (3, num_labels)) of one image."""
    if prediction.shape != reference.shape:
        raise ValueError(
            f"A prediction of size {prediction.shape} was paired with a reference of size {reference.shape}; resize "
            "the prediction to the reference size (post-processing's `target_sizes`)."
        )
    valid = reference != ignore_index
    reference, prediction = reference[valid], prediction[valid]
    unknown = (reference < 0) | (reference >= num_labels)
    if unknown.any():
        raise ValueError(
            f"References hold ids {np.unique(reference[unknown]).tolist()} outside 0..{num_labels - 1} that are not "
            f"the ignore index {ignore_index}; fix `num_labels` or `ignore_index`, or remap the labels."
        )
    predicted = (prediction >= 0) & (prediction < num_labels)  # other predicted ids match no class
    correct = prediction == reference
    return np.stack(
        [
            np.bincount(reference[correct], minlength=num_labels),
            np.bincount(prediction[predicted], minlength=num_labels),
            np.bincount(reference, minlength=num_labels),
        ]
    )


def mean_iou_from_stats(stats: np.ndarray) -> dict[str, Any]:
    """Dataset-level results from summed [`semantic_stats`]."""
    intersection, predicted, labeled = stats.astype(np.float64)
    union = predicted + labeled - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
        accuracy = np.where(labeled > 0, intersection / labeled, np.nan)
    return {
        "mean_iou": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
        "mean_accuracy": float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else float("nan"),
        "overall_accuracy": float(intersection.sum() / labeled.sum()) if labeled.sum() else float("nan"),
        "per_category_iou": iou.tolist(),
        "per_category_accuracy": accuracy.tolist(),
    }


def encode_semantic(semantic_map: Any, what: str) -> dict:
    """One map as stored: run-length encoded."""
    return encode_runs(integer_map(semantic_map, what))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(EncodedInputsMixin, evaluate.Metric):
    encode_example = staticmethod(encode_semantic)

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, RUNS_FEATURE)

    def _compute(self, predictions, references, num_labels: int | None = None, ignore_index: int = 255):
        if num_labels is None or num_labels <= 0:
            raise ValueError("mean_iou needs `num_labels` (the number of classes), e.g. compute(..., num_labels=150).")
        totals = np.zeros((3, num_labels), dtype=np.int64)
        for prediction, reference in zip(predictions, references):
            totals += semantic_stats(decode_runs(prediction), decode_runs(reference), num_labels, ignore_index)
        return mean_iou_from_stats(totals)
