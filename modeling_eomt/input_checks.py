"""Checks of the model's inputs where they enter, naming the problem and the fix (with the image's index)."""

from __future__ import annotations

import torch

from .configuration import EomtBaseConfig


def check_inputs(
    pixel_values: torch.Tensor,
    mask_labels: list[torch.Tensor] | None,
    class_labels: list[torch.Tensor] | None,
    config: EomtBaseConfig,
) -> None:
    """Shapes of the model's inputs; targets too when given (training only: those checks read the labels)."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(
            f"`pixel_values` must be a 4D tensor (batch, channels, height, width), got {shape}; "
            "use the image processor or add a batch dimension with `pixel_values[None]`."
        )
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {pixel_values.shape[1]} channels but the model expects "
            f"{config.num_channels}; convert the images (e.g. RGBA/grayscale → RGB) first."
        )
    patch = config.patch_size
    if pixel_values.shape[-2] < patch or pixel_values.shape[-1] < patch:
        raise ValueError(
            f"Input of {tuple(pixel_values.shape[-2:])} pixels is smaller than one {patch}×{patch} patch; "
            "resize the image (the processor does it) before calling the model."
        )
    if (mask_labels is None) != (class_labels is None):
        raise ValueError("Pass both `mask_labels` and `class_labels` to compute the loss, or neither.")
    if mask_labels is not None:
        check_targets(pixel_values, mask_labels, class_labels, config.num_labels)


def check_targets(
    pixel_values: torch.Tensor, mask_labels: list[torch.Tensor], class_labels: list[torch.Tensor], num_labels: int
) -> None:
    """Targets as the loss needs them, checked where they enter, with the image's index (training only: the checks
    read the labels)."""
    if len(mask_labels) != len(class_labels) or len(mask_labels) != pixel_values.shape[0]:
        raise ValueError(
            f"Got {len(mask_labels)} `mask_labels` and {len(class_labels)} `class_labels` for a batch of "
            f"{pixel_values.shape[0]} images; give one entry of each per image."
        )
    for index, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
        if not isinstance(masks, torch.Tensor) or not isinstance(classes, torch.Tensor):
            raise TypeError(
                f"Image {index}: `mask_labels` and `class_labels` entries must be tensors, e.g. "
                "`torch.tensor([1, 4], dtype=torch.long)` for two targets' class ids."
            )
        if classes.dtype.is_floating_point or classes.dtype == torch.bool or classes.ndim != 1:
            raise ValueError(
                f"Image {index}: `class_labels` must be a 1-D integer tensor, got {classes.dtype} of shape "
                f"{tuple(classes.shape)}; pass class ids as `torch.long`."
            )
        if masks.ndim != 3 or masks.shape[-2:] != pixel_values.shape[-2:]:
            raise ValueError(
                f"Image {index}: `mask_labels` must be (num_targets, height, width) at the input size "
                f"{tuple(pixel_values.shape[-2:])}, got {tuple(masks.shape)}; resize targets with the images."
            )
        if masks.shape[0] != classes.shape[0]:
            raise ValueError(
                f"Image {index}: {masks.shape[0]} target masks but {classes.shape[0]} class labels; "
                "each mask needs exactly one class id."
            )
    # The value checks read the labels: one device read for the batch, after the checks that need none.
    device = pixel_values.device
    flags = torch.stack([
        torch.stack([_non_binary(masks).to(device), _out_of_range(classes, num_labels).to(device)])
        for masks, classes in zip(mask_labels, class_labels)
    ]).tolist() if mask_labels else []  # fmt: skip
    for index, ((non_binary, out_of_range), classes) in enumerate(zip(flags, class_labels)):
        if non_binary:
            raise ValueError(
                f"Image {index}: `mask_labels` must be binary (0/1), got values outside {{0, 1}} (e.g. 0..255 "
                "masks or NaN); threshold them (`masks > 0`) first."
            )
        if out_of_range:
            raise ValueError(
                f"Image {index}: class ids must lie in [0, {num_labels - 1}] (`num_labels`={num_labels}), got "
                f"{classes.tolist()}; drop ignored segments before the model."
            )


def _non_binary(masks: torch.Tensor) -> torch.Tensor:
    if masks.dtype == torch.bool:
        return torch.zeros((), dtype=torch.bool, device=masks.device)
    return ((masks != 0) & (masks != 1)).any()


def _out_of_range(classes: torch.Tensor, num_labels: int) -> torch.Tensor:
    return ((classes < 0) | (classes >= num_labels)).any()
