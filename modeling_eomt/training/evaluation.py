"""Evaluation inside the Trainer: the processor prepares eval images exactly as at inference (padding, or sliding
windows for semantic), the model predicts, and `compute_metrics` runs the matching post-processing and accumulates
PQ, mIoU or mask AP batch by batch (`batch_eval_metrics=True`, so predictions are never stacked in memory)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from transformers import EvalPrediction

from ..image_processing import EomtImageProcessor
from ..metrics import load_metric
from .data import IGNORE_INDEX, Example

METRIC_OF_TASK = {"panoptic": "panoptic_quality", "instance": "mask_ap", "semantic": "mean_iou"}
# Headline number per task, reported as `eval_<name>`.
HEADLINE = {"panoptic": "pq", "instance": "map", "semantic": "miou"}


class EvalCollator:
    """Preprocess raw examples with the processor and carry their targets, untouched, as `targets`."""

    def __init__(self, processor: EomtImageProcessor):
        self.processor = processor

    def __call__(self, examples: Sequence[Example]) -> dict:
        inputs = self.processor(images=[example["image"] for example in examples], return_tensors="pt")
        batch = {"pixel_values": inputs["pixel_values"]}
        if "patch_offsets" in inputs:
            batch["patch_offsets"] = inputs["patch_offsets"]
        batch["targets"] = [
            {
                "masks": example["masks"],
                "class_labels": example["class_labels"],
                "is_crowd": example.get("is_crowd", torch.zeros(len(example["class_labels"]), dtype=torch.bool)),
            }
            for example in examples
        ]
        return batch


def predict_for_metrics(model: torch.nn.Module, inputs: dict) -> tuple[tuple, list[dict]]:
    """The Trainer's prediction step for segmentation: logits (and window offsets) as predictions, targets as labels."""
    targets = inputs.pop("targets")
    with torch.no_grad():
        outputs = model(**inputs)
    predictions = (outputs.class_queries_logits, outputs.masks_queries_logits)
    if outputs.patch_offsets is not None:
        predictions += (outputs.patch_offsets,)
    return predictions, targets


class SegmentationMetrics:
    """`compute_metrics` for the Trainer with `batch_eval_metrics=True`: post-process each batch, accumulate, and
    report the task's metrics (prefixed `eval_` by the Trainer) when `compute_result` is set."""

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
        self.metric = load_metric(METRIC_OF_TASK[task])

    def __call__(self, eval_pred: EvalPrediction, compute_result: bool = True) -> dict[str, float]:
        class_logits, mask_logits, *offsets = eval_pred.predictions
        outputs = SimpleNamespace(
            class_queries_logits=class_logits,
            masks_queries_logits=mask_logits,
            patch_offsets=offsets[0] if offsets else None,
        )
        targets = eval_pred.label_ids
        sizes = [tuple(target["masks"].shape[-2:]) for target in targets]
        self._add(outputs, targets, sizes)
        if not compute_result:
            return {}
        return self._compute()

    def _add(self, outputs, targets: list[dict], sizes: list[tuple[int, int]]) -> None:
        if self.task == "semantic":
            maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            references = [semantic_map(target) for target in targets]
            self.metric.add_batch(predictions=[m.cpu() for m in maps], references=references)
        elif self.task == "panoptic":
            results = self.processor.post_process_panoptic_segmentation(
                outputs, target_sizes=sizes, threshold=self.threshold, stuff_classes=self.stuff_ids
            )
            self.metric.add_batch(predictions=results, references=[segments(target) for target in targets])
        else:
            # COCO AP ranks all top-100 detections: no score threshold.
            results = self.processor.post_process_instance_segmentation(
                outputs, target_sizes=sizes, threshold=0.0, return_binary_maps=True
            )
            self.metric.add_batch(predictions=results, references=[segments(target) for target in targets])

    def _compute(self) -> dict[str, float]:
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
