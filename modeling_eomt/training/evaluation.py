"""Evaluation inside the Trainer: the processor prepares eval images exactly as at inference ([`EvalCollator`]:
padding, or sliding windows for semantic), the model predicts, and [`SegmentationMetrics`] post-processes each batch
where it was predicted and accumulates PQ, mIoU or mask AP from compact per-image records (never stacked
predictions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..configuration import IGNORE_INDEX
from ..image_processing import EomtImageProcessor
from ..metrics import load_metric

METRIC_OF_TASK = {"panoptic": "panoptic_quality", "instance": "mask_ap", "semantic": "mean_iou"}
# Headline number per task, reported as `eval_<name>`.
HEADLINE = {"panoptic": "pq", "instance": "map", "semantic": "miou"}


class SegmentationMetrics:
    """The metrics of [`EomtTrainer`]: `encode` post-processes a batch into one compact record per image (the
    metric's stored form), `add` accumulates records, `compute` reports the task's metrics (prefixed `eval_` by the
    trainer)."""

    def __init__(
        self,
        processor: EomtImageProcessor,
        task: str,
        id2label: Mapping[int, str],
        stuff_ids: Sequence[int] = (),
        threshold: float = 0.8,
    ):
        self.processor = processor
        self.task = task
        self.num_labels = len(id2label)
        self.stuff_ids = list(stuff_ids)
        self.threshold = threshold
        self.metric, self.num_images = None, 0
        self.reset()

    def reset(self) -> None:
        """Forget the records not computed yet (e.g. of an evaluation that was interrupted)."""
        if self.metric is None or self.num_images:  # `evaluate` cannot drop added examples: a fresh module
            # In memory: every process of a distributed run holds its own copy (a shared cache file would clash).
            self.metric = load_metric(METRIC_OF_TASK[self.task], keep_in_memory=True)
            self.num_images = 0

    def encode(self, outputs, targets: list[dict]) -> list[tuple[dict, dict]]:
        """Per image of a batch: its post-processed prediction and its reference, encoded as the metric stores them
        (small Python objects, cheap to gather across processes)."""
        sizes = [tuple(target["masks"].shape[-2:]) for target in targets]
        options = {
            "panoptic": {"threshold": self.threshold, "stuff_classes": self.stuff_ids},
            "instance": {"threshold": 0.0, "return_binary_maps": True},  # COCO AP ranks every detection: no threshold
            "semantic": {},
        }[self.task]
        predictions = self.processor.post_process(outputs, self.task, sizes, **options)
        references = [(semantic_map if self.task == "semantic" else segments)(target) for target in targets]
        encode = self.metric.encode_example
        return [(encode(p, "predictions"), encode(r, "references")) for p, r in zip(predictions, references)]

    def add(self, records: Sequence[tuple[dict, dict]]) -> None:
        self.metric.add_encoded_batch(
            predictions=[prediction for prediction, _ in records], references=[reference for _, reference in records]
        )
        self.num_images += len(records)

    def compute(self) -> dict[str, float]:
        """The metrics of every record added since the last `compute` or `reset` (none without records)."""
        if self.num_images == 0:
            return {}
        self.num_images = 0
        if self.task == "semantic":
            results = self.metric.compute(num_labels=self.num_labels, ignore_index=IGNORE_INDEX)
            results["miou"] = results.pop("mean_iou")
        elif self.task == "panoptic":
            results = self.metric.compute(stuff_classes=self.stuff_ids, num_labels=self.num_labels)
        else:
            results = self.metric.compute(num_labels=self.num_labels)
        return {key: float(value) for key, value in results.items() if isinstance(value, (int, float))}


def semantic_map(target: dict) -> torch.Tensor:
    """Per-pixel class ids of a target (masks → map; pixels of no mask are ignored)."""
    masks, labels = target["masks"], target["class_labels"]
    semantic = torch.full(masks.shape[-2:], IGNORE_INDEX, dtype=torch.int64)
    for mask, label in zip(masks.bool(), labels.tolist()):
        semantic[mask] = label
    return semantic


def segments(target: dict) -> dict:
    """A target as binary masks with class ids and crowd flags, the form the PQ and AP metrics read."""
    return {
        "masks": target["masks"].bool().cpu(),
        "labels": target["class_labels"].cpu(),
        "is_crowd": target["is_crowd"].cpu(),
    }
