"""
The training recipe's augmentation, in torch, on examples of the common form
(`image` uint8 [3, H, W], `masks` bool [N, H, W], `class_labels` [N], optional `is_crowd` [N]).

Every random draw goes through the optional `torch.Generator`, so a transform is a pure function of
(example, generator state); without one it uses the global torch RNG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import Example


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _coin(probability: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator).item() < probability


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    """Luma [1, H, W] of a float RGB image (ITU-R 601 weights)."""
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)


def _shift_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of a float RGB image in [0, 255] by `shift` (a fraction of the full circle)."""
    rgb = image / 255
    value, argmax = rgb.max(0)
    chroma = value - rgb.min(0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = rgb
    # Hue in sixths of the circle, from whichever channel is largest.
    hue = torch.where(
        argmax == 0, ((g - b) / safe) % 6, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue + 6 * shift) % 6
    # Back to RGB: each channel n is V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + hue) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)
    k = (offsets + hue) % 6
    return 255 * (value - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def photometric_jitter(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    The recipe's colour jitter on a uint8 image, each step with probability 0.5: brightness ±32/255, contrast and
    saturation ×[0.5, 1.5], hue ±18°.
    """
    result = image.float()
    if _coin(0.5, generator):
        result = result + _uniform(-32, 32, generator)
    if _coin(0.5, generator):
        factor = _uniform(0.5, 1.5, generator)
        result = factor * result + (1 - factor) * _grayscale(result.clamp(0, 255)).mean()
    if _coin(0.5, generator):
        factor = _uniform(0.5, 1.5, generator)
        result = factor * result + (1 - factor) * _grayscale(result.clamp(0, 255))
    if _coin(0.5, generator):
        result = _shift_hue(result.clamp(0, 255), _uniform(-18, 18, generator) / 360)
    return result.clamp(0, 255).round().to(torch.uint8)


def resize_window(example: Example, size: tuple[int, int], top: int, left: int, window: tuple[int, int]) -> Example:
    """
    The `window` (H, W) at (`top`, `left`) of the example resized to `size` (H, W); what lies beyond the resized
    image's bottom/right border is zero (void). The image is resized bilinearly (antialiased); masks are sampled
    nearest, pixel-centre aligned (torch's "nearest-exact"), and only inside the window, which keeps large upscales of
    many masks cheap.
    """
    height, width = example["image"].shape[1:]
    rows, cols = min(window[0], size[0] - top), min(window[1], size[1] - left)
    # uint8 in, uint8 out: torch's antialiased bilinear kernel for uint8 is the fast path.
    resized = F.interpolate(example["image"][None], size=size, mode="bilinear", align_corners=False, antialias=True)
    image = example["image"].new_zeros((3, *window))
    image[:, :rows, :cols] = resized[0, :, top : top + rows, left : left + cols]
    source_rows = ((torch.arange(top, top + rows) + 0.5) * (height / size[0])).long().clamp(max=height - 1)
    source_cols = ((torch.arange(left, left + cols) + 0.5) * (width / size[1])).long().clamp(max=width - 1)
    masks = example["masks"].new_zeros((example["masks"].shape[0], *window))
    masks[:, :rows, :cols] = example["masks"][:, source_rows][:, :, source_cols]
    return {**example, "image": image, "masks": masks}


def select_segments(example: Example, keep: torch.Tensor) -> Example:
    """Keep the segments where `keep` is true (masks, labels and crowd flags together)."""
    selected = {**example, "masks": example["masks"][keep], "class_labels": example["class_labels"][keep]}
    if "is_crowd" in example:
        selected["is_crowd"] = example["is_crowd"][keep]
    return selected


class TrainTransform:
    """
    The recipe's training augmentation: drop crowd segments, optional photometric jitter, horizontal flip,
    large-scale jitter (scale the image so that it fits `scale × crop_size`), zero-pad bottom/right to the crop,
    random crop, drop masks left empty.

    Args:
        crop_size (`int` or `tuple[int, int]`, defaults to 640):
            Output size (H, W); COCO 640 or 1280, ADE20K semantic 512, Cityscapes 1024.
        scale_range (`tuple[float, float]`, defaults to `(0.1, 2.0)`):
            Large-scale jitter range (COCO 0.1-2.0; ADE20K and Cityscapes 0.5-2.0).
        flip_probability (`float`, defaults to 0.5):
            Probability of a horizontal flip.
        color_jitter (`bool`, defaults to `False`):
            Apply [`photometric_jitter`] (the recipe uses it for ADE20K and Cityscapes).
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 640,
        scale_range: tuple[float, float] = (0.1, 2.0),
        flip_probability: float = 0.5,
        color_jitter: bool = False,
    ):
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"`scale_range` must be (low, high) with 0 < low <= high, got {scale_range}.")
        self.scale_range = tuple(scale_range)
        self.flip_probability = flip_probability
        self.color_jitter = color_jitter

    def __call__(self, example: Example, generator: torch.Generator | None = None) -> Example:
        if "is_crowd" in example:
            example = select_segments(example, ~example["is_crowd"])
        if self.color_jitter:
            example = {**example, "image": photometric_jitter(example["image"], generator)}
        if _coin(self.flip_probability, generator):
            example = {**example, "image": example["image"].flip(-1), "masks": example["masks"].flip(-1)}

        height, width = example["image"].shape[1:]
        crop_h, crop_w = self.crop_size
        factor = _uniform(*self.scale_range, generator) * min(crop_h / height, crop_w / width)
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        top = int(torch.randint(0, max(size[0] - crop_h, 0) + 1, (), generator=generator))
        left = int(torch.randint(0, max(size[1] - crop_w, 0) + 1, (), generator=generator))
        example = resize_window(example, size, top, left, self.crop_size)
        return select_segments(example, example["masks"].flatten(1).any(1))
