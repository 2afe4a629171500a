"""An independent forward pass of EoMT computed straight from an original-release state dict.

Written as plain functions over the original tensor names (timm's fused `qkv`, `ls1.gamma`, packed SwiGLU `fc1`,
`network.q`, …) so that it shares no code with our modules; conversion is verified by comparing the two.
Input pixels are raw values in [0, 1]: like the original, the model normalises them with its stored
`pixel_mean`/`pixel_std`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

BACKBONE = "network.encoder.backbone."
LAYER_NORM_EPS = 1e-6


@torch.no_grad()
def reference_forward(
    state_dict: Mapping[str, torch.Tensor],
    pixels: torch.Tensor,
    num_heads: int,
    weight_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final `(mask_logits (B, Q, 4h, 4w), class_logits (B, Q, C+1))` of the original model, in `compute_dtype`.

    Args:
        state_dict: Original names (`network.…`), without wrappers or `_orig_mod`.
        pixels: `(B, 3, S, S)` images in [0, 1] at the checkpoint's native size.
        num_heads: Attention heads of the backbone (not recoverable from the tensors).
        weight_dtype: Round every weight to this dtype first, to mirror a checkpoint saved at lower precision.
        compute_dtype: dtype of all arithmetic (float64 gives the exact function of the weights for comparison).
    """

    def w(name: str) -> torch.Tensor:
        tensor = state_dict[name]
        return (tensor.to(weight_dtype) if weight_dtype is not None else tensor).to(compute_dtype)

    def layer_norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w(prefix + ".weight"), w(prefix + ".bias"), LAYER_NORM_EPS)

    def linear(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, w(prefix + ".weight"), w(prefix + ".bias"))

    num_queries = state_dict["network.q.weight"].shape[0]
    mask_probs = state_dict["network.attn_mask_probs"].double()
    num_query_blocks = mask_probs.numel()
    if ((mask_probs != 0) & (mask_probs != 1)).any():
        raise ValueError(
            f"`attn_mask_probs` is {mask_probs.tolist()}: the checkpoint was saved mid-annealing, where the original "
            "drops mask restrictions at random, so no deterministic reference exists."
        )
    depth = 1 + max(int(key.split(".")[4]) for key in state_dict if key.startswith(BACKBONE + "blocks."))
    num_prefix = 1 + (state_dict[BACKBONE + "reg_token"].shape[1] if BACKBONE + "reg_token" in state_dict else 0)
    num_upscale = sum(1 for key in state_dict if key.startswith("network.upscale.") and key.endswith(".conv1.weight"))

    # Normalisation statistics are not weights: they stay exact whatever `weight_dtype` is.
    mean = state_dict["network.encoder.pixel_mean"].to(compute_dtype)
    std = state_dict["network.encoder.pixel_std"].to(compute_dtype)
    x = (pixels.to(compute_dtype) - mean) / std
    x = F.conv2d(
        x,
        w(BACKBONE + "patch_embed.proj.weight"),
        w(BACKBONE + "patch_embed.proj.bias"),
        stride=state_dict[BACKBONE + "patch_embed.proj.weight"].shape[-1],
    )
    batch, dim, grid_h, grid_w = x.shape
    x = x.flatten(2).transpose(1, 2) + w(BACKBONE + "pos_embed")
    prefix_tokens = [w(BACKBONE + "cls_token")]
    if num_prefix > 1:
        prefix_tokens.append(w(BACKBONE + "reg_token"))
    x = torch.cat([t.expand(batch, -1, -1) for t in prefix_tokens] + [x], dim=1)

    def predict(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = layer_norm(tokens, BACKBONE + "norm")
        queries = tokens[:, :num_queries]
        grid = tokens[:, num_queries + num_prefix :].transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
        for i in range(num_upscale):
            up = f"network.upscale.{i}."
            grid = F.conv_transpose2d(grid, w(up + "conv1.weight"), w(up + "conv1.bias"), stride=2)
            grid = F.conv2d(F.gelu(grid), w(up + "conv2.weight"), padding=1, groups=dim)
            grid = layer_norm(grid.permute(0, 2, 3, 1), up + "norm").permute(0, 3, 1, 2)
        embed = queries
        for i in (0, 2, 4):
            embed = linear(embed, f"network.mask_head.{i}")
            embed = F.gelu(embed) if i < 4 else embed
        return torch.einsum("bqc,bchw->bqhw", embed, grid), linear(queries, "network.class_head")

    def attention(h: torch.Tensor, prefix: str, allowed: torch.Tensor | None) -> torch.Tensor:
        tokens = h.shape[1]
        q, k, v = linear(h, prefix + ".qkv").view(batch, tokens, 3, num_heads, dim // num_heads).unbind(2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * (dim // num_heads) ** -0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        context = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, tokens, dim)
        return linear(context, prefix + ".proj")

    def mlp(h: torch.Tensor, prefix: str) -> torch.Tensor:
        hidden = linear(h, prefix + ".fc1")
        if hidden.shape[-1] == 2 * state_dict[prefix + ".fc2.weight"].shape[1]:
            gate, up = hidden.chunk(2, dim=-1)  # timm's packed SwiGLU: SiLU on the first half
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return linear(hidden, prefix + ".fc2")

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
        x = x + w(block + ".ls1.gamma") * attention(layer_norm(x, block + ".norm1"), block + ".attn", allowed)
        x = x + w(block + ".ls2.gamma") * mlp(layer_norm(x, block + ".norm2"), block + ".mlp")
    return predict(x)
