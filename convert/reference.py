"""An independent forward pass of EoMT computed straight from an original-release state dict.

Written as plain functions over the original tensor names so that it shares no code with our modules; conversion is
verified by comparing the two. Both backbone families of the release are covered: DINOv2 as timm builds it (fused
`qkv`, `ls1.gamma`, packed SwiGLU `fc1`, a learned `pos_embed`) and DINOv3 as transformers builds it, renamed by the
release (`patch_embed.cls_token`, `blocks.N.attention.q_proj`, `layer_scale1.lambda1`, rotary position embeddings
on the patch tokens). DINOv3 tensors must already be absolute (base backbone + the checkpoint's deltas).
Input pixels are raw values in [0, 1]: like the original, the model normalises them with its stored
`pixel_mean`/`pixel_std`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

BACKBONE = "network.encoder.backbone."
# timm's DINOv2 and the release's LayerNorm2d of the upscale blocks.
LAYER_NORM_EPS = 1e-6
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


@torch.no_grad()
def reference_forward(
    state_dict: Mapping[str, torch.Tensor],
    pixels: torch.Tensor,
    num_heads: int,
    weight_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    layer_norm_eps: float = LAYER_NORM_EPS,
    rope_theta: float = 100.0,
    hidden_act: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final `(mask_logits (B, Q, 4h, 4w), class_logits (B, Q, C+1))` of the original model, in `compute_dtype`.

    Args:
        state_dict: Original names (`network.…`), without wrappers or `_orig_mod`.
        pixels: `(B, 3, S, S)` images in [0, 1] at the checkpoint's native size.
        num_heads: Attention heads of the backbone (not recoverable from the tensors).
        weight_dtype: Round every weight to this dtype first, to mirror a checkpoint saved at lower precision.
        compute_dtype: dtype of all arithmetic (float64 gives the exact function of the weights for comparison).
        layer_norm_eps: Epsilon of the backbone's LayerNorms (1e-5 in DINOv3's config).
        rope_theta: Base period of DINOv3's rotary position embedding.
        hidden_act: Activation of DINOv3's MLP ("gelu", or "silu" in its gated MLP).
    """
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"The reference knows the activations {', '.join(ACTIVATIONS)}, not {hidden_act!r}.")
    dinov3 = BACKBONE + "patch_embed.cls_token" in state_dict

    def w(name: str) -> torch.Tensor:
        tensor = state_dict[name]
        return (tensor.to(weight_dtype) if weight_dtype is not None else tensor).to(compute_dtype)

    def layer_norm(x: torch.Tensor, prefix: str, eps: float = layer_norm_eps) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w(prefix + ".weight"), w(prefix + ".bias"), eps)

    def linear(x: torch.Tensor, prefix: str) -> torch.Tensor:
        bias = w(prefix + ".bias") if prefix + ".bias" in state_dict else None  # DINOv3's k_proj has none
        return F.linear(x, w(prefix + ".weight"), bias)

    num_queries = state_dict["network.q.weight"].shape[0]
    mask_probs = state_dict["network.attn_mask_probs"].double()
    num_query_blocks = mask_probs.numel()
    if ((mask_probs != 0) & (mask_probs != 1)).any():
        raise ValueError(
            f"`attn_mask_probs` is {mask_probs.tolist()}: the checkpoint was saved mid-annealing, where the original "
            "drops mask restrictions at random, so no deterministic reference exists."
        )
    depth = 1 + max(int(key.split(".")[4]) for key in state_dict if key.startswith(BACKBONE + "blocks."))
    num_upscale = sum(1 for key in state_dict if key.startswith("network.upscale.") and key.endswith(".conv1.weight"))
    if dinov3:  # transformers' DINOv3 embeddings, which the release calls `patch_embed`
        patch, prefix_names = BACKBONE + "patch_embed.patch_embeddings", ["cls_token", "register_tokens"]
        prefix_names = [BACKBONE + "patch_embed." + name for name in prefix_names]
    else:
        patch, prefix_names = BACKBONE + "patch_embed.proj", [BACKBONE + "cls_token", BACKBONE + "reg_token"]
    prefix_names = [name for name in prefix_names if name in state_dict]
    num_prefix = sum(state_dict[name].shape[1] for name in prefix_names)

    # Normalisation statistics are not weights: they stay exact whatever `weight_dtype` is.
    mean = state_dict["network.encoder.pixel_mean"].to(compute_dtype)
    std = state_dict["network.encoder.pixel_std"].to(compute_dtype)
    x = (pixels.to(compute_dtype) - mean) / std
    x = F.conv2d(x, w(patch + ".weight"), w(patch + ".bias"), stride=state_dict[patch + ".weight"].shape[-1])
    batch, dim, grid_h, grid_w = x.shape
    head_dim = dim // num_heads
    x = x.flatten(2).transpose(1, 2)
    if not dinov3:
        x = x + w(BACKBONE + "pos_embed")
    x = torch.cat([w(name).expand(batch, -1, -1) for name in prefix_names] + [x], dim=1)
    rope = _rope(grid_h, grid_w, head_dim, rope_theta, compute_dtype) if dinov3 else None

    def predict(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = layer_norm(tokens, BACKBONE + "norm")
        queries = tokens[:, :num_queries]
        grid = tokens[:, num_queries + num_prefix :].transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
        for i in range(num_upscale):
            up = f"network.upscale.{i}."
            grid = F.conv_transpose2d(grid, w(up + "conv1.weight"), w(up + "conv1.bias"), stride=2)
            grid = F.conv2d(F.gelu(grid), w(up + "conv2.weight"), padding=1, groups=dim)
            grid = layer_norm(grid.permute(0, 2, 3, 1), up + "norm", LAYER_NORM_EPS).permute(0, 3, 1, 2)
        embed = queries
        for i in (0, 2, 4):
            embed = linear(embed, f"network.mask_head.{i}")
            embed = F.gelu(embed) if i < 4 else embed
        return torch.einsum("bqc,bchw->bqhw", embed, grid), linear(queries, "network.class_head")

    def attention(h: torch.Tensor, block: str, allowed: torch.Tensor | None) -> torch.Tensor:
        tokens = h.shape[1]
        if dinov3:
            q, k, v = (linear(h, f"{block}.attention.{name}_proj") for name in "qkv")
            q, k, v = (t.view(batch, tokens, num_heads, head_dim) for t in (q, k, v))
            q, k = _rotate_patches(q, rope), _rotate_patches(k, rope)
        else:
            q, k, v = linear(h, block + ".attn.qkv").view(batch, tokens, 3, num_heads, head_dim).unbind(2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * head_dim**-0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        context = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, tokens, dim)
        return linear(context, block + (".attention.o_proj" if dinov3 else ".attn.proj"))

    def mlp(h: torch.Tensor, block: str) -> torch.Tensor:
        if dinov3:
            if f"{block}.mlp.gate_proj.weight" in state_dict:
                hidden = ACTIVATIONS[hidden_act](linear(h, block + ".mlp.gate_proj")) * linear(
                    h, block + ".mlp.up_proj"
                )
            else:
                hidden = ACTIVATIONS[hidden_act](linear(h, block + ".mlp.up_proj"))
            return linear(hidden, block + ".mlp.down_proj")
        hidden = linear(h, block + ".mlp.fc1")
        if hidden.shape[-1] == 2 * state_dict[block + ".mlp.fc2.weight"].shape[1]:
            gate, up = hidden.chunk(2, dim=-1)  # timm's packed SwiGLU: SiLU on the first half
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return linear(hidden, block + ".mlp.fc2")

    scales = (".layer_scale1.lambda1", ".layer_scale2.lambda1") if dinov3 else (".ls1.gamma", ".ls2.gamma")
    first_query_block = depth - num_query_blocks
    for i in range(depth):
        block = f"{BACKBONE}blocks.{i}"
        allowed = None
        if i == first_query_block:
            x = torch.cat([w("network.q.weight").expand(batch, -1, -1), x], dim=1)
        if i >= first_query_block and mask_probs[i - first_query_block] == 1:
            mask_logits, _ = predict(x)
            covered = F.interpolate(mask_logits, (grid_h, grid_w), mode="bilinear").flatten(2) > 0
            allowed = torch.ones(batch, x.shape[1], x.shape[1], dtype=torch.bool)
            allowed[:, :num_queries, num_queries + num_prefix :] = covered
        x = x + w(block + scales[0]) * attention(layer_norm(x, block + ".norm1"), block, allowed)
        x = x + w(block + scales[1]) * mlp(layer_norm(x, block + ".norm2"), block)
    return predict(x)


def _rope(grid_h: int, grid_w: int, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """DINOv3's `(cos, sin)`, each `(h·w, head_dim)`: patch centres in [-1, 1] per axis (y, x), head_dim/4
    frequencies `theta^(-4j/head_dim)`, angles `2π·coordinate·frequency` as a y block then an x block, tiled twice."""
    frequencies = theta ** (-4 * torch.arange(head_dim // 4, dtype=torch.float64) / head_dim)
    ys = (torch.arange(grid_h, dtype=torch.float64) + 0.5) * 2 / grid_h - 1
    xs = (torch.arange(grid_w, dtype=torch.float64) + 0.5) * 2 / grid_w - 1
    y, x = (axis.flatten() for axis in torch.meshgrid(ys, xs, indexing="ij"))
    angles = 2 * math.pi * torch.cat([y[:, None] * frequencies, x[:, None] * frequencies], dim=1)
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_patches(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the last h·w tokens of `t` (B, N, heads, head_dim); queries, CLS and registers stay as they are."""
    cos, sin = (r[:, None] for r in rope)
    prefix, patches = t.split([t.shape[1] - cos.shape[0], cos.shape[0]], dim=1)
    first, second = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([prefix, rotated], dim=1)
