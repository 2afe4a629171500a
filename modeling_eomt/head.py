"""EoMT's prediction head: query tokens → class logits and mask embeddings; patch tokens → pixel embeddings.

A query's mask logits are its mask embedding dotted with every pixel embedding. Predictions keep the two factors
(`MaskPrediction`): the loss and the attention masks read them at a few points and never need all the logits.

This module holds the plain reference of every computation; `banded_upscale.py` runs the last upscale layer a band of
rows at a time with the same results and less memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration import EomtConfig


def compute_mask_logits(mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor) -> torch.Tensor:
    """Mask logits `(..., Q, H, W)`: mask embeddings `(..., Q, D)` dotted with pixel embeddings `(..., H, W, D)`."""
    pixels = pixel_embeddings.flatten(-3, -2).transpose(-1, -2)
    return torch.matmul(mask_embeddings, pixels).unflatten(-1, pixel_embeddings.shape[-3:-1])


class MaskPrediction(NamedTuple):
    """One prediction of the head, with its mask logits left factored (`mask_logits()` multiplies them out)."""

    mask_embeddings: torch.Tensor  # (B, Q, D)
    pixel_embeddings: torch.Tensor  # (B, H, W, D), channels last
    class_logits: torch.Tensor  # (B, Q, num_labels + 1)
    # `(mask embeddings, pixel embeddings) -> mask logits`, differentiable. The banded fast path passes one that
    # differentiates through the last upscale layer without autograd holding the pixel embeddings.
    logits_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = compute_mask_logits

    def mask_logits(self, mask_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits `(B, Q', H, W)` of all queries, or of the given mask embeddings `(B, Q', D)`."""
        queries = self.mask_embeddings if mask_embeddings is None else mask_embeddings
        return self.logits_function(queries, self.pixel_embeddings)


class EomtMaskHead(nn.Module):
    """Three-layer MLP turning query tokens into mask embeddings."""

    def __init__(self, config: EomtConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.fc2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.fc3 = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.activation(self.fc2(self.activation(self.fc1(hidden_states)))))


class EomtScaleLayer(nn.Module):
    """×2 upsampling of a channels-last map `(B, H, W, D)`: transposed conv (k=2, s=2) → activation → depthwise
    3×3 conv → LayerNorm over channels."""

    def __init__(self, config: EomtConfig):
        super().__init__()
        dim = config.hidden_size
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.activation = ACT2FN[config.hidden_act]
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.layernorm2d = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv2(self.activation(self.conv1(hidden_states.permute(0, 3, 1, 2))))
        return self.layernorm2d(hidden_states.permute(0, 2, 3, 1))


class EomtScaleBlock(nn.Module):
    def __init__(self, config: EomtConfig):
        super().__init__()
        self.block = nn.ModuleList(EomtScaleLayer(config) for _ in range(config.num_upscale_blocks))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.block:
            hidden_states = layer(hidden_states)
        return hidden_states


def split_tokens(
    tokens: torch.Tensor, grid: tuple[int, int], num_queries: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tokens `(B, Q, D)` and patch tokens as a channels-last map `(B, h, w, D)` from `[queries | prefix |
    patches]`."""
    patches = tokens[:, num_queries + num_prefix_tokens :]
    return tokens[:, :num_queries], patches.reshape(patches.shape[0], grid[0], grid[1], patches.shape[-1])


def patch_grid_logits(prediction: MaskPrediction, grid: tuple[int, int]) -> torch.Tensor:
    """Mask logits bilinearly resized to the patch grid, `(B, Q, h·w)`.

    Resizing is linear, so resizing the pixel embeddings first gives the same logits without computing them at full
    resolution."""
    pixel_embeddings = prediction.pixel_embeddings.permute(0, 3, 1, 2)
    patch_embeddings = F.interpolate(pixel_embeddings, size=grid, mode="bilinear", align_corners=False)
    return torch.bmm(prediction.mask_embeddings, patch_embeddings.flatten(2))
