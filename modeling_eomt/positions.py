"""Patch positions of the two backbone families: DINOv2's learned table, resized to any patch grid, and DINOv3's
rotary embeddings (2-D RoPE on the patch tokens only: queries, CLS and registers are never rotated), with the
training-time coordinate augmentations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import EomtDinov3Config


def resize_position_grid(table: torch.Tensor, source: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """A patch-position table `(h·w, D)` laid out on the `source` grid, resized to `grid` by bicubic antialiased
    interpolation (as timm resizes DINOv2's position embeddings); an exact copy when the grids are equal."""
    image = table.reshape(1, *source, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=grid, mode="bicubic", align_corners=False, antialias=True)
    return image.flatten(2).transpose(1, 2)[0].to(table.dtype)


class EomtRotaryEmbedding(nn.Module):
    """DINOv3's 2-D rotary embedding: `cos`, `sin` `(h·w, head_dim)` for the patch tokens of a grid.

    Patch centres have coordinates `2(i + 0.5)/n − 1` per axis; angles `2π·c·inv_freq` (y block, then x block, tiled
    twice), `inv_freq[j] = theta^(−4j/head_dim)`. In training the coordinates are shifted, jittered and rescaled
    (`pos_embed_shift`, `pos_embed_jitter`, `pos_embed_rescale`).
    """

    def __init__(self, config: EomtDinov3Config):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.default_inv_freq(), persistent=False)

    def default_inv_freq(self) -> torch.Tensor:
        return 1 / self.config.rope_theta ** torch.arange(0, 1, 4 / self.config.head_dim, dtype=torch.float32)

    def forward(self, grid: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.inv_freq.device
        coords_y = torch.arange(0.5, grid[0], device=device, dtype=torch.float32) / grid[0]
        coords_x = torch.arange(0.5, grid[1], device=device, dtype=torch.float32) / grid[1]
        coords = torch.stack(torch.meshgrid(coords_y, coords_x, indexing="ij"), dim=-1).flatten(0, 1) * 2 - 1
        if self.training:
            coords = self.augment(coords)
        angles = 2 * math.pi * coords[:, :, None] * self.inv_freq  # (h·w, 2, head_dim / 4)
        angles = angles.flatten(1).tile(2)  # cos/sin in float32: half-precision angles lose the fine frequencies
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def augment(self, coords: torch.Tensor) -> torch.Tensor:
        shift, jitter, rescale = (
            self.config.pos_embed_shift,
            self.config.pos_embed_jitter,
            self.config.pos_embed_rescale,
        )
        if shift is not None:
            coords = coords + coords.new_empty(1, 2).uniform_(-shift, shift)
        if jitter is not None:
            coords = coords * coords.new_empty(1, 2).uniform_(-math.log(jitter), math.log(jitter)).exp()
        if rescale is not None:
            coords = coords * coords.new_empty(1).uniform_(-math.log(rescale), math.log(rescale)).exp()
        return coords


def rotate_patch_tokens(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last `cos.shape[0]` tokens of `(B, heads, T, head_dim)` states; queries and prefix stay as they are."""
    prefix, patches = states.split((states.shape[-2] - cos.shape[0], cos.shape[0]), dim=-2)
    half = patches.shape[-1] // 2
    rotated_half = torch.cat([-patches[..., half:], patches[..., :half]], dim=-1)
    return torch.cat([prefix, patches * cos + rotated_half * sin], dim=-2)
