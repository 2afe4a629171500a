"""Batching examples of the common form: [`SegmentationCollator`] for training (augmented crops → the model's training
inputs), [`EvalCollator`] for evaluation (raw images through the processor, exactly as at inference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..configuration import IMAGENET_MEAN, IMAGENET_STD
from ..image_processing import EomtImageProcessor
from .dataset import Example


def readable(examples: Sequence[Example | None]) -> list[Example]:
    """The examples of a batch without those a dataset skipped as unreadable (`None`, see `skip_unreadable`)."""
    kept = [example for example in examples if example is not None]
    if not kept:
        raise ValueError(
            "Cannot collate an empty batch"
            + (" (every example of it was skipped as unreadable)." if examples else ".")
        )
    return kept


class SegmentationCollator:
    """
    Collate examples (`image` uint8 [3, H, W], `masks` bool [N, H, W], `class_labels` int64 [N]) into
    - `pixel_values`: float [B, 3, H, W], rescaled to [0, 1] and normalised like the image processor,
    - `mask_labels`: list of float [N_i, H, W],
    - `class_labels`: list of int64 [N_i].

    Images of different sizes are zero-padded bottom/right to the largest (before normalisation, like the recipe's
    padding); masks are padded with background. Other keys of the examples are not passed on, so the batch can go
    straight into the model.

    Args:
        image_mean, image_std (`Sequence[float]`, default to the ImageNet statistics):
            Normalisation; use the values of the image processor that will serve the model.
    """

    def __init__(self, image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD):
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, examples: Sequence[Example | None]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        examples = readable(examples)
        height = max(example["image"].shape[1] for example in examples)
        width = max(example["image"].shape[2] for example in examples)
        images = torch.zeros(len(examples), 3, height, width, dtype=torch.uint8)
        mask_labels = []
        for i, example in enumerate(examples):
            h, w = example["image"].shape[1:]
            images[i, :, :h, :w] = example["image"]
            masks = torch.zeros(example["masks"].shape[0], height, width)
            masks[:, :h, :w] = example["masks"]
            mask_labels.append(masks)
        pixel_values = (images.float() / 255 - self.image_mean) / self.image_std
        return {
            "pixel_values": pixel_values,
            "mask_labels": mask_labels,
            "class_labels": [example["class_labels"].to(torch.int64) for example in examples],
        }


class EvalCollator:
    """Preprocess raw examples with the processor and carry their targets, untouched, as `targets`."""

    def __init__(self, processor: EomtImageProcessor):
        self.processor = processor

    def __call__(self, examples: Sequence[Example | None]) -> dict:
        examples = readable(examples)
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
