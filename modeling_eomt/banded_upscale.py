"""Fast path of the head's upscaling: the last upscale layer, and the mask logits, a band of rows at a time.

The plain computation is `EomtScaleBlock.forward` followed by `compute_mask_logits` (`head.py`); every function here
returns the same values (and gradients) with less memory, and tests compare the two through `band_rows`.

The upscaled maps set the peak memory of EoMT: at 640 with ViT-S, one 160×160×384 map per image, plus the
activation, conv and norm intermediates of the last layer and their gradients, per prediction (one per query block
in training). Here the layer's transposed conv (k=2, s=2: no overlap) is one matmul into each pixel's four
sub-pixels, and the rest (activation, depthwise conv, LayerNorm) runs band by band, in forward and recomputed in
backward, so only the sub-pixel map, the output and their gradients exist at full size. In training, every
prediction of a forward writes its pixel embeddings into one shared map without autograd (`prediction_in_bands`)
and its mask logits differentiate through the bands (`_MaskLogitsInBands`); at inference the logits themselves are
made band by band (`mask_logits_in_bands`), so no full-size pixel map exists.

Bands hold about 8 MB on CPU (reused from the heap and cached; larger bands measured a higher peak) and 256 MB on
accelerators (whose allocators reuse memory anyway; fewer kernel launches). Compiled graphs and exports use the plain
path: the band loops depend on the input size, and compilers fuse the plain ops themselves.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .head import EomtScaleBlock, EomtScaleLayer, MaskPrediction, compute_mask_logits

_CPU_BAND_ELEMENTS = 2**21
_ACCELERATOR_BAND_ELEMENTS = 2**26
# Bands of at least this many rows keep the coarse row a band shares with each neighbour (computed by both) a modest
# share.
_MIN_BAND_ROWS = 8


class Band(NamedTuple):
    """Rows of an upsampled map and the coarse rows that give them; `pad`: whether the band reaches the map's top /
    bottom border, beyond which the conv reads zeros."""

    rows: slice
    coarse: slice
    pad: tuple[int, int]


def default_band_rows(batch_size: int, width: int, dim: int, device: torch.device) -> int:
    """Rows per band of upscaled maps `(batch_size, rows, width, dim)` on `device`."""
    elements = _CPU_BAND_ELEMENTS if device.type == "cpu" else _ACCELERATOR_BAND_ELEMENTS
    return max(_MIN_BAND_ROWS, elements // (batch_size * width * dim))


def bands(height: int, band_rows: int) -> Iterator[Band]:
    """Bands of about `band_rows` rows of the 2×`height`-row output of a scale layer.

    Output rows 2i and 2i + 1 come from coarse row i, and the conv reads a row above and below. Bands that start and
    end at odd rows (except at the map's borders) therefore need whole coarse rows, and share one with each neighbour.
    """
    step = max(1, band_rows // 2)
    for start in range(0, height, step):
        stop = min(start + step, height)
        first, last = start == 0, stop == height
        rows = slice(0 if first else 2 * start - 1, 2 * height if last else 2 * stop - 1)
        yield Band(rows, slice(start if first else start - 1, stop), (int(first), int(last)))


def expand_parameters(layer: EomtScaleLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed conv as a linear map from a pixel to its 2×2 sub-pixels: weight `(4·D, D)`, bias `(4·D,)`.
    A relayout (copy) of the weights: callers expanding band after band make it once."""
    # conv1.weight is (in, out, 2, 2). Ordered (row, column, channel), the interleaving into the 2× map moves whole
    # channel vectors, not single floats.
    return layer.conv1.weight.permute(0, 2, 3, 1).flatten(1).T, layer.conv1.bias.repeat(4)


def expand(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Transposed conv with `expand_parameters`: `(B, H, W, D)` → sub-pixel outputs `(B, H, W, 2, 2, D)`."""
    return F.linear(hidden_states, weight, bias).unflatten(-1, (2, 2, hidden_states.shape[-1]))


def refine_parameters(layer: EomtScaleLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `refine` computes with: the depthwise conv's weight and the LayerNorm's weight and bias."""
    return layer.conv2.weight, layer.layernorm2d.weight, layer.layernorm2d.bias


def refine(
    layer: EomtScaleLayer, subpixels: torch.Tensor, band: Band, conv_weight: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Output rows `band.rows` from the sub-pixel outputs `(B, n, W, 2, 2, D)` of the coarse rows `band.coarse`:
    interleave, activation, depthwise conv, LayerNorm.

    Those coarse rows give the output rows plus the one above and below that the conv reads, where the map has them,
    so bands inside the map need no padding; a band at a border pads both sides and drops one row.
    """
    batch_size, num_rows, width, _, _, dim = subpixels.shape
    hidden = subpixels.transpose(2, 3).reshape(batch_size, 2 * num_rows, 2 * width, dim)
    hidden = layer.activation(hidden).permute(0, 3, 1, 2)
    top, bottom = band.pad
    hidden = F.conv2d(hidden, conv_weight, padding=(int(top or bottom), 1), groups=dim)
    if top != bottom:  # padded on both sides: drop the row computed against a zero row that is not a border
        hidden = hidden[:, :, :-1] if top else hidden[:, :, 1:]
    return F.layer_norm(hidden.permute(0, 2, 3, 1), (dim,), norm_weight, norm_bias, layer.layernorm2d.eps)


def refine_map(
    layer: EomtScaleLayer, subpixels: torch.Tensor, params: tuple[torch.Tensor, ...], band_rows: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """`refine` over the whole map `(B, H, W, 2, 2, D)` → `(B, 2H, 2W, D)`, band by band, written into `out` when it
    has the right shape and dtype (else into a new map)."""
    batch_size, height, width, _, _, dim = subpixels.shape
    band_rows = band_rows or default_band_rows(batch_size, 2 * width, dim, subpixels.device)
    for band in bands(height, band_rows):
        refined = refine(layer, subpixels[:, band.coarse], band, *params)
        if out is None or out.shape != (batch_size, 2 * height, 2 * width, dim) or out.dtype != refined.dtype:
            out = refined.new_empty(batch_size, 2 * height, 2 * width, dim)  # the dtype autocast gives LayerNorm
        out[:, band.rows] = refined
        del refined  # before the next band's maps exist
    return out


def upscale_layer_in_bands(layer: EomtScaleLayer, hidden_states: torch.Tensor, band_rows: int | None = None):
    """`layer(hidden_states)`, differentiable, with the intermediates of one band at a time."""
    subpixels = expand(hidden_states, *expand_parameters(layer))
    return _RefineInBands.apply(subpixels, layer, band_rows, *refine_parameters(layer))


def upscale_in_bands(block: EomtScaleBlock, hidden_states: torch.Tensor, band_rows: int | None = None):
    """`block(hidden_states)`, differentiable, every layer band by band."""
    for layer in block.block:
        hidden_states = upscale_layer_in_bands(layer, hidden_states, band_rows)
    return hidden_states


def prediction_in_bands(
    block: EomtScaleBlock, feature_map: torch.Tensor, mask_embeddings: torch.Tensor, class_logits: torch.Tensor,
    previous: MaskPrediction | None = None, band_rows: int | None = None,
) -> MaskPrediction:  # fmt: skip
    """A training prediction whose pixel embeddings carry no gradient and overwrite those of `previous` (which must
    be used up: one map serves every prediction of a forward); its mask logits differentiate through the last layer
    band by band. Equal to `MaskPrediction(mask_embeddings, block(feature_map), class_logits)`."""
    *coarser, last = block.block
    for layer in coarser:
        feature_map = upscale_layer_in_bands(layer, feature_map, band_rows)
    subpixels, params = expand(feature_map, *expand_parameters(last)), refine_parameters(last)
    reuse = None if previous is None else previous.pixel_embeddings
    with torch.no_grad():
        pixel_embeddings = refine_map(last, subpixels, params, band_rows, out=reuse)
    # Inference tensors keep no version counter: there, overwriting goes undetected.
    version = None if pixel_embeddings.is_inference() else pixel_embeddings._version
    logits_function = functools.partial(_banded_mask_logits, last, subpixels, params, band_rows, version)
    return MaskPrediction(mask_embeddings, pixel_embeddings, class_logits, logits_function)


@torch.no_grad()
def mask_logits_in_bands(
    block: EomtScaleBlock, feature_map: torch.Tensor, mask_embeddings: torch.Tensor, band_rows: int | None = None
) -> torch.Tensor:
    """`compute_mask_logits(mask_embeddings, block(feature_map))` for inference, without a full-size pixel map: the
    last layer and the product run image by image, band by band (each band expands its own coarse rows)."""
    *coarser, last = block.block
    for layer in coarser:
        feature_map = refine_map(layer, expand(feature_map, *expand_parameters(layer)), refine_parameters(layer))
    weight, bias = expand_parameters(last)
    params = refine_parameters(last)
    batch_size, height, width, dim = feature_map.shape
    band_rows = band_rows or default_band_rows(1, 2 * width, dim, feature_map.device)
    masks = None
    for image in range(batch_size):  # image by image, so that bands stay tall at any batch size
        for band in bands(height, band_rows):
            rows = feature_map[image : image + 1, band.coarse]
            refined = refine(last, expand(rows, weight, bias), band, *params)
            band_masks = compute_mask_logits(mask_embeddings[image : image + 1], refined)
            del refined
            if masks is None:  # allocated from the first band: the dtype autocast gives the product
                masks = band_masks.new_empty(batch_size, band_masks.shape[1], 2 * height, 2 * width)
            masks[image, :, band.rows] = band_masks[0]
            del band_masks  # before the next band's maps exist
    return masks


class _RefineInBands(torch.autograd.Function):
    """`refine_map` with a banded backward: activation, conv and LayerNorm are recomputed band by band from the saved
    sub-pixel outputs. Backward uses the parameters forward saw (saved, so that changing them in between raises
    autograd's usual error). Double backward is not supported."""

    @staticmethod
    def forward(
        ctx, subpixels: torch.Tensor, layer: EomtScaleLayer, band_rows: int | None, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(subpixels, *params)
        ctx.layer, ctx.band_rows, ctx.autocast = layer, band_rows, _autocast_state(subpixels.device)
        return refine_map(layer, subpixels, params, band_rows)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        subpixels, *params = ctx.saved_tensors
        needs_grad = [ctx.needs_input_grad[0], *ctx.needs_input_grad[3:]]
        grads = _backward_in_bands(ctx, subpixels, params, needs_grad, lambda band, _: grad_output[:, band.rows])
        return grads[0], None, None, *grads[1:]


class _MaskLogitsInBands(torch.autograd.Function):
    """Mask logits of mask embeddings `(B, Q, D)` against pixel embeddings made without autograd as
    `refine_map(layer, subpixels)`. Backward recomputes the pixel embeddings band by band, and each band's gradient
    comes from its rows of the logits' gradient, so neither they nor their gradient exist as a full-size map (the
    loss's few matched queries would otherwise make a full-size gradient per prediction from a skinny product)."""

    @staticmethod
    def forward(
        ctx, queries: torch.Tensor, pixel_embeddings: torch.Tensor, subpixels: torch.Tensor, layer: EomtScaleLayer,
        band_rows: int | None, *params: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(queries, subpixels, *params)
        ctx.layer, ctx.band_rows, ctx.autocast = layer, band_rows, _autocast_state(subpixels.device)
        return compute_mask_logits(queries, pixel_embeddings)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries, subpixels, *params = ctx.saved_tensors
        queries = queries.detach()  # the products below are gradients, not part of a graph
        # Summed over bands in float32 at least: a sum of many half-precision band products would lose bits.
        accumulate = torch.promote_types(queries.dtype, torch.float32)
        grad_queries = torch.zeros_like(queries, dtype=accumulate) if ctx.needs_input_grad[0] else None

        def band_gradient(band: Band, refined: torch.Tensor) -> torch.Tensor:
            band_grad = grad_logits[:, :, band.rows].flatten(2)  # (B, Q, pixels of the band)
            if grad_queries is not None:
                grad_queries.add_(band_grad @ refined.detach().flatten(1, 2))
            return (band_grad.transpose(1, 2) @ queries).view(refined.shape).to(refined.dtype)

        needs_grad = [ctx.needs_input_grad[2], *ctx.needs_input_grad[5:]]
        grads = _backward_in_bands(ctx, subpixels, params, needs_grad, band_gradient)
        grad_queries = None if grad_queries is None else grad_queries.to(queries.dtype)
        return grad_queries, None, grads[0], None, None, *grads[1:]


def _autocast_state(device: torch.device) -> dict | None:
    """Autocast arguments reproducing the current state on `device` (None where autocast does not exist, e.g. meta)."""
    if not torch.amp.is_autocast_available(device.type):
        return None
    enabled, dtype = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    return {"device_type": device.type, "dtype": dtype, "enabled": enabled}


def _backward_in_bands(
    ctx, subpixels: torch.Tensor, params: list[torch.Tensor], needs_grad: list[bool],
    band_gradient: Callable[[Band, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor | None]:  # fmt: skip
    """Gradients of `subpixels` and `params` (None where `needs_grad` is False) of a `refine_map` output, recomputing
    it band by band under forward's autocast state. `band_gradient(band, refined)` gives the gradient of a band's
    output rows, from the band's recomputed output."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "The banded upscale does not support double backward (`create_graph=True`): its backward recomputes the "
            "upscaled map band by band without a differentiable graph. Use `model.set_upscale_implementation("
            "'reference')` for higher-order gradients."
        )
    params = [p.detach().requires_grad_(need) for p, need in zip(params, needs_grad[1:])]
    grad_subpixels = torch.empty_like(subpixels) if needs_grad[0] else None
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    written = 0  # coarse rows of grad_subpixels written so far; a band shares its first row with the band before
    batch_size, height, width, _, _, dim = subpixels.shape
    band_rows = ctx.band_rows or default_band_rows(batch_size, 2 * width, dim, subpixels.device)
    recompute = torch.autocast(**ctx.autocast) if ctx.autocast else contextlib.nullcontext()
    with torch.enable_grad(), recompute:
        for band in bands(height, band_rows):
            band_input = subpixels[:, band.coarse].detach().requires_grad_(needs_grad[0])
            inputs = [t for t, need in zip([band_input, *params], needs_grad) if need]
            refined = refine(ctx.layer, band_input, band, *params)
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
    layer: EomtScaleLayer, subpixels: torch.Tensor, params: tuple[torch.Tensor, ...], band_rows: int | None,
    version: int | None, queries: torch.Tensor, pixel_embeddings: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """`MaskPrediction.logits_function` of `prediction_in_bands`, which left the shared map at `version`."""
    if version is not None and pixel_embeddings._version != version:
        raise RuntimeError(
            "These pixel embeddings were overwritten by a later prediction of the same forward (they share one map); "
            "take a prediction's mask logits before the next prediction is made."
        )
    return _MaskLogitsInBands.apply(queries, pixel_embeddings, subpixels, layer, band_rows, *params)
