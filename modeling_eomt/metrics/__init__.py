"""`evaluate` modules shipped with the package: panoptic quality, mean IoU and mask AP.

Each lives in its own folder as an `evaluate` script, so `evaluate.load("<folder>")` works offline; [`load_metric`]
does that by name.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS = ("panoptic_quality", "mean_iou", "mask_ap")


def metric_path(name: str) -> str:
    """Folder of the `evaluate` module `name`, for `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose one of {', '.join(METRICS)}.")
    return str(Path(__file__).resolve().parent / name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of one of our metrics by name (`panoptic_quality`, `mean_iou` or `mask_ap`), offline."""
    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "load_metric", "metric_path"]
