"""EoMT: a plain ViT whose last blocks also process learned queries, followed by a light mask/class head.

Reading order: embeddings → ViT blocks (queries join before block L − num_blocks) → head (`head`).
In training, each of the last `num_blocks` blocks restricts every query's attention to the patches of its
current mask prediction; the restriction is annealed away per block (`attn_mask_probs`), so inference is a plain
ViT forward followed by one head call.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration import EomtConfig
from .loss import EomtLoss, MaskPrediction, compute_mask_logits

logger = logging.get_logger(__name__)

# Elements of one band of an upscaled map (`EomtScaleLayer.bands`). On CPU 8 MB in float32, small enough to be reused
# from the heap and to stay in cache (bands of 32 MB measured a higher peak resident memory at inference). On
# accelerators, whose caching allocators reuse memory anyway, bands only bound the intermediates' memory, and larger
# ones launch fewer kernels. Bands of at least `_MIN_BAND_ROWS` rows keep the coarse row a band shares with each
# neighbour (computed by both) a modest share.
_BAND_ELEMENTS = 2**21
_ACCELERATOR_BAND_ELEMENTS = 2**26
_MIN_BAND_ROWS = 8

_KEEP_MATMUL_OUTPUTS = functools.partial(
    create_selective_checkpoint_contexts, [torch.ops.aten.addmm.default, torch.ops.aten.mm.default]
)


def recompute_all_but_matmuls(
    function: Callable[[torch.Tensor], torch.Tensor], hidden_states: torch.Tensor
) -> torch.Tensor:
    """`function(hidden_states)`, keeping for backward only the outputs of its matrix multiplications.

    The rest (activations, layout copies) is memory-bound work that is cheaper to redo in backward than to store:
    in an MLP this drops the activated hidden-width tensor for a few percent more compute.
    """
    if not torch.is_grad_enabled():
        return function(hidden_states)
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device):
        # Autocast caches weight casts within its region (a second forward reuses them), so the recompute would cast
        # where the forward reused the cache; without the cache both make the same calls.
        function = functools.partial(_without_autocast_cache, function, device)
    return checkpoint(function, hidden_states, use_reentrant=False, context_fn=_KEEP_MATMUL_OUTPUTS)


def _without_autocast_cache(
    function: Callable[[torch.Tensor], torch.Tensor], device: str, hidden_states: torch.Tensor
) -> torch.Tensor:
    with torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False):
        return function(hidden_states)


@dataclass
class EomtForUniversalSegmentationOutput(ModelOutput):
    r"""
    Output of [`EomtForUniversalSegmentation`]; feed it to the processor's `post_process_*_segmentation`.

    Args:
        loss (`torch.Tensor`, *optional*):
            Total loss over every supervised prediction, returned when `mask_labels` and `class_labels` are given.
        class_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`):
            Class logits of each query; the last class is "no object".
        masks_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, height, width)`):
            Mask logits of each query at `2**num_upscale_blocks` times the patch grid.
        last_hidden_state (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Normalised output tokens, ordered `[queries | CLS | registers | patches]`.
        hidden_states (`tuple(torch.Tensor)`, *optional*):
            Embedding output and the output of every block, when `output_hidden_states=True`.
        attentions (`tuple(torch.Tensor)`, *optional*):
            Attention probabilities of every block `(batch_size, num_heads, seq, seq)`, when `output_attentions=True`
            (eager attention only).
        patch_offsets (`list[torch.Tensor]`, *optional*):
            Passed through from the processor's sliding windows, for semantic post-processing.
        intermediate_class_queries_logits (`tuple(torch.Tensor)`, *optional*):
            Class logits predicted before each of the last `num_blocks` blocks, when
            `output_intermediate_predictions=True`.
        intermediate_masks_queries_logits (`tuple(torch.Tensor)`, *optional*):
            Mask logits predicted before each of the last `num_blocks` blocks, when
            `output_intermediate_predictions=True`.
        loss_dict (`dict[str, torch.Tensor]`, *optional*):
            The weighted loss terms, summed over predictions, when a loss is computed.
    """

    loss: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    patch_offsets: list[torch.Tensor] | None = None
    intermediate_class_queries_logits: tuple[torch.Tensor, ...] | None = None
    intermediate_masks_queries_logits: tuple[torch.Tensor, ...] | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


class EomtPatchEmbeddings(nn.Module):
    def __init__(self, config: EomtConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values.to(self.projection.weight.dtype))


class EomtEmbeddings(nn.Module):
    """Patch tokens with position embeddings, preceded by the CLS and register tokens (which get none)."""

    def __init__(self, config: EomtConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
        self.patch_embeddings = EomtPatchEmbeddings(config)
        self.position_embeddings = nn.Embedding(config.grid_size[0] * config.grid_size[1], config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.native_grid = config.grid_size
        self.num_prefix_tokens = 1 + config.num_register_tokens

    def position_embeddings_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings `(1, h*w, D)` for a patch grid; resampled bicubically when it is not the native one."""
        weight = self.position_embeddings.weight
        if grid == self.native_grid:
            return weight[None]
        table = weight.reshape(1, *self.native_grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False, antialias=True)
        return table.to(weight.dtype).flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patches = self.patch_embeddings(pixel_values)
        grid = (patches.shape[-2], patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2) + self.position_embeddings_for(grid)
        batch_size = patches.shape[0]
        prefix = torch.cat([self.cls_token, self.register_tokens], dim=1).expand(batch_size, -1, -1)
        return self.dropout(torch.cat([prefix.to(patches.dtype), patches], dim=1)), grid


class EomtAttention(nn.Module):
    """Multi-head self-attention."""

    def __init__(self, config: EomtConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        # Fusing q/k/v into one matmul would need the weights concatenated on every call; on CPU that copy costs
        # more than the fused matmul saves.
        query, key, value = (
            proj(hidden_states).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        dropout = self.dropout if self.training else 0.0

        attn_weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
            if attention_mask is not None:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            attn_weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
            context = torch.matmul(F.dropout(attn_weights, p=dropout, training=self.training), value)
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(batch_size, seq_len, -1)
        return self.out_proj(context), (attn_weights if output_attentions else None)


class EomtLayerScale(nn.Module):
    def __init__(self, config: EomtConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class EomtMLP(nn.Module):
    def __init__(self, config: EomtConfig):
        super().__init__()
        hidden_features = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden_features)
        self.fc2 = nn.Linear(hidden_features, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class EomtSwiGLUFFN(nn.Module):
    def __init__(self, config: EomtConfig):
        super().__init__()
        # Two thirds of the MLP width keeps the parameter count of a GELU MLP; DINOv2 rounds up to a multiple of 8.
        hidden_features = (int(config.hidden_size * config.mlp_ratio * 2 / 3) + 7) // 8 * 8
        self.gate_proj = nn.Linear(config.hidden_size, hidden_features)
        self.up_proj = nn.Linear(config.hidden_size, hidden_features)
        self.down_proj = nn.Linear(hidden_features, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class EomtDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * keep / keep_prob


class EomtLayer(GradientCheckpointingLayer):
    """Pre-norm ViT block with LayerScale: `x + ls1(attn(norm1 x))`, then `x + ls2(mlp(norm2 x))`."""

    def __init__(self, config: EomtConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = EomtAttention(config)
        self.layer_scale1 = EomtLayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EomtSwiGLUFFN(config) if config.use_swiglu_ffn else EomtMLP(config)
        self.layer_scale2 = EomtLayerScale(config)
        self.drop_path = EomtDropPath(config.drop_path_rate)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attention(self.norm1(hidden_states), attention_mask, output_attentions)
        hidden_states = self.add_branch(hidden_states, attn_output, self.layer_scale1)
        # Under activation checkpointing the whole layer is recomputed anyway.
        checkpointed = self.gradient_checkpointing and self.training
        mlp_input = self.norm2(hidden_states)
        mlp_output = self.mlp(mlp_input) if checkpointed else recompute_all_but_matmuls(self.mlp, mlp_input)
        hidden_states = self.add_branch(hidden_states, mlp_output, self.layer_scale2)
        return hidden_states, attn_weights

    def add_branch(
        self, hidden_states: torch.Tensor, branch: torch.Tensor, layer_scale: EomtLayerScale
    ) -> torch.Tensor:
        """`x + drop_path(γ · branch)`, in one pass over memory (addcmul) when no path can be dropped."""
        if self.training and self.drop_path.drop_prob > 0:
            return hidden_states + self.drop_path(layer_scale(branch))
        return torch.addcmul(hidden_states, branch, layer_scale.lambda1)


class EomtScaleLayer(nn.Module):
    """×2 upsampling: transposed conv (k=2, s=2) → activation → depthwise 3×3 conv → LayerNorm over channels.

    Runs on channels-last `(B, H, W, D)` maps: the transposed conv is one matmul into the four sub-pixel outputs
    (a k=2, s=2 transposed conv has no overlap), and the depthwise conv and the LayerNorm need no layout copies.
    The rest runs a band of rows at a time (`refine_map`, `_RefineInBands`; in the head, the last layer also through
    `_MaskLogitsInBands` or `predict_in_bands`), so its intermediate maps stay small.
    """

    def __init__(self, config: EomtConfig):
        super().__init__()
        dim = config.hidden_size
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.activation = ACT2FN[config.hidden_act]
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.layernorm2d = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        subpixels = self.expand(hidden_states, *self.expand_parameters())
        return _RefineInBands.apply(subpixels, self, *self.refine_parameters())

    def expand_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The transposed conv as a linear map from a pixel to its 2×2 sub-pixels: weight `(4·D, D)` and bias `(4·D,)`.
        A relayout (copy) of the weights: callers expanding band after band make it once."""
        # conv1.weight is (in, out, 2, 2). Ordered (row, column, channel), the interleaving into the 2× map moves
        # whole channel vectors, not single floats.
        return self.conv1.weight.permute(0, 2, 3, 1).flatten(1).T, self.conv1.bias.repeat(4)

    def expand(self, hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Transposed conv with `expand_parameters()`: `(B, H, W, D)` → sub-pixel outputs `(B, H, W, 2, 2, D)` (row
        offset, column offset)."""
        return F.linear(hidden_states, weight, bias).unflatten(-1, (2, 2, hidden_states.shape[-1]))

    def refine_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `refine` computes with: the depthwise conv's weight and the LayerNorm's weight and bias."""
        return self.conv2.weight, self.layernorm2d.weight, self.layernorm2d.bias

    def refine(
        self, subpixels: torch.Tensor, band: _Band, conv_weight: torch.Tensor, norm_weight: torch.Tensor,
        norm_bias: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Output rows `band.rows` of the upsampled map from the sub-pixel outputs `(B, n, W, 2, 2, D)` of the coarse
        rows `band.coarse`: interleave, activation, depthwise conv, LayerNorm (with `refine_parameters()`).

        Those coarse rows give the output rows plus the one above and below that the conv reads, where the map has
        them (`bands`), so bands inside the map need no padding and no slicing (whose gradient is zero-filled); a
        band at a border pads both sides and drops one row.
        """
        batch_size, num_rows, width, _, _, dim = subpixels.shape
        # One name for the band's maps: rebinding frees each as soon as the next exists (outside autograd).
        hidden = subpixels.transpose(2, 3).reshape(batch_size, 2 * num_rows, 2 * width, dim)
        hidden = self.activation(hidden).permute(0, 3, 1, 2)
        top, bottom = band.pad
        hidden = F.conv2d(hidden, conv_weight, padding=(int(top or bottom), 1), groups=dim)
        if top != bottom:  # padded on both sides: drop the row computed against a zero row that is not a border
            hidden = hidden[:, :, :-1] if top else hidden[:, :, 1:]
        return F.layer_norm(hidden.permute(0, 2, 3, 1), (dim,), norm_weight, norm_bias, self.layernorm2d.eps)

    def refine_map(
        self, subpixels: torch.Tensor, params: tuple[torch.Tensor, ...], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`refine` over the whole map `(B, H, W, 2, 2, D)` → `(B, 2H, 2W, D)`, a band of rows at a time, written into
        `out` when it has the right shape and dtype (else into a new map)."""
        batch_size, height, width, _, _, dim = subpixels.shape
        for band in self.bands(height, _band_rows(batch_size, 2 * width, dim, subpixels.device)):
            refined = self.refine(subpixels[:, band.coarse], band, *params)
            if out is None or out.shape != (batch_size, 2 * height, 2 * width, dim) or out.dtype != refined.dtype:
                out = refined.new_empty(batch_size, 2 * height, 2 * width, dim)  # the dtype autocast gives LayerNorm
            out[:, band.rows] = refined
            del refined  # before the next band's maps exist
        return out

    @staticmethod
    def bands(height: int, band_rows: int) -> Iterator[_Band]:
        """Bands of about `band_rows` rows of the 2×`height`-row output, for `refine`.

        Output rows 2i and 2i + 1 come from coarse row i, and the conv reads a row above and below. Bands that start
        and end at odd rows (except at the map's borders) therefore need whole coarse rows, and share one with each
        neighbour band.
        """
        step = max(1, band_rows // 2)
        for start in range(0, height, step):
            stop = min(start + step, height)
            first, last = start == 0, stop == height
            rows = slice(0 if first else 2 * start - 1, 2 * height if last else 2 * stop - 1)
            yield _Band(rows, slice(start if first else start - 1, stop), (int(first), int(last)))


class _Band(NamedTuple):
    """Rows of an upsampled map and the coarse rows that give them; `pad`: whether the band reaches the map's top /
    bottom border, beyond which the conv reads zeros."""

    rows: slice
    coarse: slice
    pad: tuple[int, int]


def _band_rows(batch_size: int, width: int, dim: int, device: torch.device) -> int:
    """Rows per band of upscaled maps `(batch_size, rows, width, dim)` on `device`."""
    elements = _BAND_ELEMENTS if device.type == "cpu" else _ACCELERATOR_BAND_ELEMENTS
    return max(_MIN_BAND_ROWS, elements // (batch_size * width * dim))


class _RefineInBands(torch.autograd.Function):
    """`layer.refine` over the whole map, a band of rows at a time, in forward and in backward.

    Only the input sub-pixel outputs (kept for backward, as the matmul's output), the output and their gradients
    are full-size maps. Activation, conv and LayerNorm live one band at a time and are recomputed band by band in
    backward: full-size intermediates would each be fresh allocations of tens of MB (page-faulted in on CPU), and
    memory-bound passes over small bands run from cache. Backward uses the parameters forward saw (saved, so that
    changing them in between raises autograd's usual error). Double backward is not supported, and `torch.compile`
    runs this layer eagerly (a graph break at the per-band gradients of backward).
    """

    @staticmethod
    def forward(ctx, subpixels: torch.Tensor, layer: EomtScaleLayer, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(subpixels, *params)
        ctx.layer, ctx.autocast = layer, _autocast_state(subpixels.device)
        return layer.refine_map(subpixels, params)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        subpixels, *params = ctx.saved_tensors
        needs_grad = [ctx.needs_input_grad[0], *ctx.needs_input_grad[2:]]
        grads = _backward_in_bands(ctx, subpixels, params, needs_grad, lambda band, _: grad_output[:, band.rows])
        return grads[0], None, *grads[1:]


class _MaskLogitsInBands(torch.autograd.Function):
    """Mask logits `(B, Q, 2H, 2W)` of mask embeddings `(B, Q, D)` against the last upscale layer's output, where
    that output (`pixel_embeddings`, `layer.refine_map(subpixels)`) was computed without autograd.

    Backward recomputes the output band by band from the saved sub-pixel outputs, and each band's gradient comes
    from its rows of the logits' gradient, so neither the output nor its gradient is held as a full-size map. The
    model can thus reuse one pixel-embedding map for every prediction of a forward; the loss's few matched queries
    would otherwise make a full-size gradient per prediction from a skinny product, a slow fresh allocation.
    """

    @staticmethod
    def forward(
        ctx, queries: torch.Tensor, pixel_embeddings: torch.Tensor, subpixels: torch.Tensor, layer: EomtScaleLayer,
        *params: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(queries, subpixels, *params)
        ctx.layer, ctx.autocast = layer, _autocast_state(subpixels.device)
        return compute_mask_logits(queries, pixel_embeddings)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries, subpixels, *params = ctx.saved_tensors
        queries = queries.detach()  # the products below are gradients, not part of a graph
        # Summed over bands in float32 at least: a sum of many half-precision band products would lose bits.
        accumulate = torch.promote_types(queries.dtype, torch.float32)
        grad_queries = torch.zeros_like(queries, dtype=accumulate) if ctx.needs_input_grad[0] else None

        def band_gradient(band: _Band, refined: torch.Tensor) -> torch.Tensor:
            band_grad = grad_logits[:, :, band.rows].flatten(2)  # (B, Q, pixels of the band)
            if grad_queries is not None:
                grad_queries.add_(band_grad @ refined.detach().flatten(1, 2))
            return (band_grad.transpose(1, 2) @ queries).view(refined.shape).to(refined.dtype)

        needs_grad = [ctx.needs_input_grad[2], *ctx.needs_input_grad[4:]]
        grads = _backward_in_bands(ctx, subpixels, params, needs_grad, band_gradient)
        grad_queries = None if grad_queries is None else grad_queries.to(queries.dtype)
        return grad_queries, None, grads[0], None, *grads[1:]


def _autocast_state(device: torch.device) -> dict | None:
    """Autocast arguments reproducing the current state on `device` (None where autocast does not exist, e.g. meta)."""
    if not torch.amp.is_autocast_available(device.type):
        return None
    enabled, dtype = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    return {"device_type": device.type, "dtype": dtype, "enabled": enabled}


def _backward_in_bands(
    ctx, subpixels: torch.Tensor, params: list[torch.Tensor], needs_grad: list[bool],
    band_gradient: Callable[[_Band, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor | None]:  # fmt: skip
    """Gradients of `subpixels` and `params` (None where `needs_grad` is False) for a `ctx.layer.refine_map`
    output, recomputing it band by band under forward's autocast state. `band_gradient(band, refined)` gives the
    gradient of a band's output rows, from the band's recomputed output."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "EomtScaleLayer does not support double backward (`create_graph=True`): its backward recomputes the "
            "upscaled map band by band without a differentiable graph."
        )
    params = [p.detach().requires_grad_(need) for p, need in zip(params, needs_grad[1:])]
    grad_subpixels = torch.empty_like(subpixels) if needs_grad[0] else None
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    written = 0  # coarse rows of grad_subpixels written so far; a band shares its first row with the band before
    batch_size, height, width, _, _, dim = subpixels.shape
    recompute = torch.autocast(**ctx.autocast) if ctx.autocast else contextlib.nullcontext()
    with torch.enable_grad(), recompute:
        for band in ctx.layer.bands(height, _band_rows(batch_size, 2 * width, dim, subpixels.device)):
            band_input = subpixels[:, band.coarse].detach().requires_grad_(needs_grad[0])
            inputs = [t for t, need in zip([band_input, *params], needs_grad) if need]
            refined = ctx.layer.refine(band_input, band, *params)
            output_grad = band_gradient(band, refined)
            if not inputs:  # only the queries of the mask logits need a gradient
                continue
            band_grads = iter(torch.autograd.grad(refined, inputs, output_grad))
            if needs_grad[0]:
                grad, start, stop = next(band_grads), band.coarse.start, band.coarse.stop
                grad_subpixels[:, start:written] += grad[:, : written - start]
                grad_subpixels[:, written:stop] = grad[:, written - start :]
                written = stop
            for index, need in enumerate(needs_grad[1:]):
                if need:
                    grad = next(band_grads)
                    param_grads[index] = grad if param_grads[index] is None else param_grads[index] + grad
    return [grad_subpixels, *param_grads]


def _banded_mask_logits(
    layer: EomtScaleLayer, subpixels: torch.Tensor, params: tuple[torch.Tensor, ...], version: int | None,
    queries: torch.Tensor, pixel_embeddings: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """`MaskPrediction.logits_function` of a prediction whose pixel embeddings were made as
    `layer.refine_map(subpixels, params)`, leaving them at `version` (None: untracked inference tensors)."""
    if version is not None and pixel_embeddings._version != version:
        raise RuntimeError(
            "These pixel embeddings were overwritten by a later prediction of the same forward (they share one map); "
            "take a prediction's mask logits before the next `head` call."
        )
    return _MaskLogitsInBands.apply(queries, pixel_embeddings, subpixels, layer, *params)


class EomtScaleBlock(nn.Module):
    def __init__(self, config: EomtConfig):
        super().__init__()
        self.block = nn.ModuleList(EomtScaleLayer(config) for _ in range(config.num_upscale_blocks))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.block:
            hidden_states = layer(hidden_states)
        return hidden_states

    def all_but_last(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, EomtScaleLayer]:
        """The output of every layer but the last, and the last layer: callers run that one their own way."""
        *coarser, last = self.block
        for layer in coarser:
            hidden_states = layer(hidden_states)
        return hidden_states, last


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


class EomtPreTrainedModel(PreTrainedModel):
    config_class = EomtConfig
    config: EomtConfig
    base_model_prefix = "eomt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["EomtLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, std=std)
        elif isinstance(module, EomtLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)
        elif isinstance(module, EomtEmbeddings):
            init.trunc_normal_(module.cls_token, std=std)
            init.zeros_(module.register_tokens)
        elif isinstance(module, EomtLoss):
            init.copy_(module.empty_weight, module.default_empty_weight())
        elif isinstance(module, EomtForUniversalSegmentation):
            init.ones_(module.attn_mask_probs)


class EomtForUniversalSegmentation(EomtPreTrainedModel):
    """EoMT with its class and mask head, for panoptic, instance and semantic segmentation."""

    def __init__(self, config: EomtConfig):
        super().__init__(config)
        self.embeddings = EomtEmbeddings(config)
        self.layers = nn.ModuleList(EomtLayer(config) for _ in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.query = nn.Embedding(config.num_queries, config.hidden_size)
        self.upscale_block = EomtScaleBlock(config)
        self.mask_head = EomtMaskHead(config)
        self.class_predictor = nn.Linear(config.hidden_size, config.num_labels + 1)
        self.criterion = EomtLoss(config)
        # Probability, per query block, that a query's attention is restricted to its mask (annealed 1 → 0).
        self.register_buffer("attn_mask_probs", torch.ones(config.num_blocks))
        self._masking_cache: tuple[tuple[int, int, int], tuple[bool, ...]] | None = None
        self.post_init()

    @property
    def first_query_layer(self) -> int:
        return self.config.num_hidden_layers - self.config.num_blocks

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @torch.no_grad()
    def set_attn_mask_probs(self, probs: torch.Tensor | list[float]) -> None:
        """Set the masked-attention probability of each query block (annealing writes it before every step)."""
        self.attn_mask_probs.copy_(torch.as_tensor(probs, dtype=self.attn_mask_probs.dtype))

    @classmethod
    def from_backbone(cls, name_or_path: str, **config_fields) -> EomtForUniversalSegmentation:
        """EoMT whose ViT holds a pretrained DINOv2/DINOv3 backbone's weights; queries and heads start fresh.

        `name_or_path`: a Hub id or local folder in transformers' format, or a timm-format DINOv2 state dict file;
        `config_fields` override the EoMT config (`image_size`, `patch_size`, `num_queries`, `id2label`, ...).
        """
        from .backbones import from_backbone  # the backbone readers pull in transformers' DINO models

        return from_backbone(cls, name_or_path, **config_fields)

    @torch.compiler.disable  # compiled code calls it eagerly and specialises on the flags it returns
    def masking_blocks(self) -> tuple[bool, ...]:
        """Per query block, whether it masks attention (its annealing probability is above 0).

        Read from `attn_mask_probs` once per change of the buffer (any in-place update, `load_state_dict`
        included, bumps its version), so that a forward does not wait on the device for it: a read per block would
        synchronise an accelerator, and break a compiled graph, once per query block.
        """
        probs = self.attn_mask_probs
        if probs.is_inference():  # no version counter to tell a change by
            return tuple((probs > 0).tolist())
        key = (id(probs), probs.data_ptr(), probs._version)
        if self._masking_cache is None or self._masking_cache[0] != key:
            self._masking_cache = (key, tuple((probs > 0).tolist()))
        return self._masking_cache[1]

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_intermediate_predictions: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EomtForUniversalSegmentationOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; any size of at least one patch (position embeddings are resampled).
            mask_labels (`list[torch.Tensor]`, *optional*):
                Per image, binary target masks `(num_targets, height, width)` at the input resolution.
            class_labels (`list[torch.LongTensor]`, *optional*):
                Per image, the class id of each target mask `(num_targets,)`.
            patch_offsets (`list[torch.Tensor]`, *optional*):
                Sliding-window offsets from the processor, returned unchanged for post-processing.
            output_intermediate_predictions (`bool`, defaults to `False`):
                Also return the predictions made before each query block.
        """
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        self._check_inputs(pixel_values, mask_labels, class_labels)
        compute_loss = mask_labels is not None

        hidden_states, grid = self.embeddings(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        targets = self.criterion.targets(mask_labels, class_labels, pixel_values.device) if compute_loss else None
        # Each prediction is used up (loss, attention mask, intermediate outputs) before the next one is made, so
        # that they can all share one pixel-embedding map (`head`).
        loss_terms, intermediate, prediction = [], [], None
        masking_blocks = self.masking_blocks()

        for index, layer in enumerate(self.layers):
            attention_mask = None
            if index == self.first_query_layer:
                queries = self.query.weight[None].expand(hidden_states.shape[0], -1, -1).to(hidden_states.dtype)
                hidden_states = torch.cat([queries, hidden_states], dim=1)
            if index >= self.first_query_layer:
                block = index - self.first_query_layer
                masking = masking_blocks[block]
                # Predictions before query blocks enter the loss: all of them in training, the masking ones in eval.
                enters_loss = compute_loss and (masking or self.training)
                if masking or enters_loss or output_intermediate_predictions:
                    prediction = self.head(self.layernorm(hidden_states), grid, prediction)
                    if enters_loss:
                        loss_terms.append(self.criterion(prediction, targets))
                    if output_intermediate_predictions:
                        intermediate.append((prediction.class_logits, prediction.mask_logits()))
                    if masking:
                        prob = self.attn_mask_probs[block]
                        attention_mask = self._query_attention_mask(prediction, grid, prob, hidden_states.shape[1])
            hidden_states, attn_weights = layer(hidden_states, attention_mask, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)

        sequence_output = self.layernorm(hidden_states)
        loss = loss_dict = None
        if compute_loss or torch.is_grad_enabled():
            final = self.head(sequence_output, grid, prediction)
            class_queries_logits, masks_queries_logits = final.class_logits, final.mask_logits()
            if compute_loss:
                loss_terms.append(self.criterion(final, targets))
                loss_dict = {name: sum(terms[name] for terms in loss_terms) for name in loss_terms[0]}
                loss = sum(loss_dict.values())
        else:
            class_queries_logits, masks_queries_logits = self.predict_in_bands(sequence_output, grid)

        predictions = {"class_queries_logits": class_queries_logits, "masks_queries_logits": masks_queries_logits}
        if intermediate:
            predictions["intermediate_class_queries_logits"], predictions["intermediate_masks_queries_logits"] = map(
                tuple, zip(*intermediate)
            )
        output = EomtForUniversalSegmentationOutput(
            loss=loss, loss_dict=loss_dict, last_hidden_state=sequence_output, hidden_states=all_hidden_states,
            attentions=all_attentions, patch_offsets=patch_offsets, **predictions,
        )  # fmt: skip
        return output if return_dict else output.to_tuple()

    def head(
        self, tokens: torch.Tensor, grid: tuple[int, int], previous: MaskPrediction | None = None
    ) -> MaskPrediction:
        """Mask embeddings `(B, Q, D)`, pixel embeddings `(B, s·h, s·w, D)` (`s = 2**num_upscale_blocks`) and class
        logits `(B, Q, C+1)` from normalised tokens. A query's mask logits are its mask embedding dotted with every
        pixel embedding; the loss and the attention masks work on the two factors and never need all of them.

        Unless activation checkpointing recomputes the whole upscale block, the pixel embeddings carry no gradient
        (`_MaskLogitsInBands` differentiates the mask logits) and overwrite those of the `previous` prediction of the
        forward, which must be used up: one map serves every prediction.
        """
        queries, feature_map = self._split_tokens(tokens, grid)
        mask_embeddings, class_logits = self.mask_head(queries), self.class_predictor(queries)
        if self.is_activation_checkpointing and torch.is_grad_enabled():
            # The upscaled maps dominate training memory (one set per prediction): recompute them in backward.
            pixel_embeddings = checkpoint(self.upscale_block, feature_map, use_reentrant=False)
            return MaskPrediction(mask_embeddings, pixel_embeddings, class_logits)
        feature_map, last = self.upscale_block.all_but_last(feature_map)
        subpixels, params = last.expand(feature_map, *last.expand_parameters()), last.refine_parameters()
        reuse = None if previous is None else previous.pixel_embeddings
        with torch.no_grad():
            pixel_embeddings = last.refine_map(subpixels, params, out=reuse)
        # Inference tensors keep no version counter, and compiled code does not count eager's in-place writes: there,
        # overwriting goes undetected.
        untracked = pixel_embeddings.is_inference() or torch.compiler.is_compiling()
        version = None if untracked else pixel_embeddings._version
        logits_function = functools.partial(_banded_mask_logits, last, subpixels, params, version)
        return MaskPrediction(mask_embeddings, pixel_embeddings, class_logits, logits_function)

    @torch.no_grad()
    def predict_in_bands(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and mask logits as `head(...)` gives them, for inference: the last upscale layer and the query
        product run a band of rows at a time, so no full-resolution map exists besides the logits (the upscale maps
        set the peak memory of a forward)."""
        queries, feature_map = self._split_tokens(tokens, grid)
        feature_map, last = self.upscale_block.all_but_last(feature_map)
        expand_parameters, refine_parameters = last.expand_parameters(), last.refine_parameters()
        mask_embeddings = self.mask_head(queries)
        batch_size, height, width, dim = feature_map.shape
        masks = None
        # Image by image, so that bands stay tall at any batch size: each band expands its own coarse rows, and its
        # context rows are expanded twice (no full-size sub-pixel map, unlike training, which keeps it for backward).
        for image in range(batch_size):
            for band in last.bands(height, _band_rows(1, 2 * width, dim, feature_map.device)):
                rows = feature_map[image : image + 1, band.coarse]
                refined = last.refine(last.expand(rows, *expand_parameters), band, *refine_parameters)
                band_masks = compute_mask_logits(mask_embeddings[image : image + 1], refined)
                del refined
                if masks is None:  # allocated from the first band: the dtype autocast gives the product
                    masks = band_masks.new_empty(batch_size, band_masks.shape[1], 2 * height, 2 * width)
                masks[image, :, band.rows] = band_masks[0]
                del band_masks  # before the next band's maps exist
        return self.class_predictor(queries), masks

    def _split_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Query tokens `(B, Q, D)` and patch tokens as a channels-last map `(B, h, w, D)`."""
        num_queries = self.config.num_queries
        patches = tokens[:, num_queries + self.embeddings.num_prefix_tokens :]
        return tokens[:, :num_queries], patches.reshape(patches.shape[0], *grid, -1)

    @torch.no_grad()
    def _query_attention_mask(
        self, prediction: MaskPrediction, grid: tuple[int, int], prob: torch.Tensor, seq_len: int
    ) -> torch.Tensor:
        """Boolean `(B, 1, T, T)` mask (True = attend): each query sees only the patches its mask covers.

        Queries, CLS and registers stay visible to everyone; each query keeps its restriction with probability
        `prob`, so annealing `prob` to 0 turns masked attention into plain attention.
        """
        batch_size, num_queries, _ = prediction.mask_embeddings.shape
        device = prediction.mask_embeddings.device
        # The mask logits resized to the patch grid; resizing is linear, so resizing the pixel embeddings first gives
        # the same logits without computing them at full resolution.
        pixel_embeddings = prediction.pixel_embeddings.permute(0, 3, 1, 2)
        patch_embeddings = F.interpolate(pixel_embeddings, size=grid, mode="bilinear", align_corners=False)
        sees_patch = torch.bmm(prediction.mask_embeddings, patch_embeddings.flatten(2)) > 0
        released = torch.rand(batch_size, num_queries, 1, device=device) > prob
        attention_mask = torch.ones(batch_size, 1, seq_len, seq_len, dtype=torch.bool, device=device)
        patch_start = num_queries + self.embeddings.num_prefix_tokens
        attention_mask[:, 0, :num_queries, patch_start:] = sees_patch | released
        return attention_mask

    def _check_inputs(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None,
        class_labels: list[torch.Tensor] | None,
    ) -> None:
        if pixel_values is None or pixel_values.ndim != 4:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"`pixel_values` must be a 4D tensor (batch, channels, height, width), got shape {shape}; "
                "use the image processor or add a batch dimension with `pixel_values[None]`."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` has {pixel_values.shape[1]} channels but the model expects "
                f"{self.config.num_channels}; convert the images (e.g. RGBA/grayscale → RGB) first."
            )
        patch = self.config.patch_size
        if pixel_values.shape[-2] < patch or pixel_values.shape[-1] < patch:
            raise ValueError(
                f"Input of {tuple(pixel_values.shape[-2:])} pixels is smaller than one {patch}×{patch} patch; "
                "resize the image (the processor does it) before calling the model."
            )
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("Pass both `mask_labels` and `class_labels` to compute the loss, or neither.")
        if mask_labels is None:
            return
        if len(mask_labels) != len(class_labels) or len(mask_labels) != pixel_values.shape[0]:
            raise ValueError(
                f"Got {len(mask_labels)} `mask_labels` and {len(class_labels)} `class_labels` for a batch of "
                f"{pixel_values.shape[0]} images; give one entry of each per image."
            )
        for index, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
            if masks.shape[0] != classes.shape[0]:
                raise ValueError(
                    f"Image {index}: {masks.shape[0]} target masks but {classes.shape[0]} class labels; "
                    "each mask needs exactly one class id."
                )
            if classes.numel() and (classes.min() < 0 or classes.max() >= self.config.num_labels):
                raise ValueError(
                    f"Image {index}: class ids must lie in [0, {self.config.num_labels - 1}] (`num_labels`="
                    f"{self.config.num_labels}), got {classes.tolist()}; drop ignored segments before the model."
                )
