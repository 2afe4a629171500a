"""The banded fast path of the head (`banded_upscale.py`) against its plain reference (`head.py`), through
`band_rows`: values, gradients, memory, autocast, and the model choosing between them."""

import pytest
import torch
from tiny_eomt import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation, banded_upscale
from modeling_eomt.head import EomtScaleBlock, compute_mask_logits

BAND_ROWS = (2, 4, 64)  # bands of one and two coarse rows, and whole-map bands


def make_model(**overrides) -> EomtForUniversalSegmentation:
    model = EomtForUniversalSegmentation(EomtConfig(**{**TINY, **overrides}))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def stock_upscale(block: EomtScaleBlock, feature_map: torch.Tensor) -> torch.Tensor:
    """The upscale block as stock NCHW modules compute it, independently of `head.py`."""
    hidden = feature_map.permute(0, 3, 1, 2)
    for layer in block.block:
        hidden = layer.conv2(layer.activation(layer.conv1(hidden)))
        hidden = layer.layernorm2d(hidden.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return hidden.permute(0, 2, 3, 1)


def test_reference_head_equals_stock_modules():
    block = make_model(num_upscale_blocks=2).upscale_block
    feature_map = torch.randn(2, 3, 5, TINY["hidden_size"])
    torch.testing.assert_close(block(feature_map), stock_upscale(block, feature_map), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("upscale_blocks", [1, 2])
@pytest.mark.parametrize("height", [1, 3, 4, 5])
@pytest.mark.parametrize("frozen", [(), ("conv2",), ("conv1", "layernorm2d")])
def test_banded_upscale_equals_the_reference(upscale_blocks, height, frozen):
    # Forward and backward a band of rows at a time, on maps of odd and even heights, exercise every border; frozen
    # parameters get no gradient and change nothing else.
    block = make_model(num_upscale_blocks=upscale_blocks).upscale_block
    for name, param in block.named_parameters():
        param.requires_grad_(name.split(".")[2] not in frozen)
    feature_map = torch.randn(2, height, 5, TINY["hidden_size"], requires_grad=True)
    inputs = [feature_map] + [p for p in block.parameters() if p.requires_grad]
    expected = block(feature_map)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    for rows in BAND_ROWS:
        banded = banded_upscale.upscale_in_bands(block, feature_map, band_rows=rows)
        torch.testing.assert_close(banded, expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(torch.autograd.grad(banded, inputs, upstream), expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_band_sizes_follow_the_device():
    # CPU: bands of a few MB, reused from the heap and cached; accelerators: a few large bands, fewer kernel launches.
    batch, width, dim = 16, 160, 384  # ViT-S at 640, a GPU-sized batch
    cpu_rows = banded_upscale.default_band_rows(batch, width, dim, torch.device("cpu"))
    gpu_rows = banded_upscale.default_band_rows(batch, width, dim, torch.device("cuda"))
    assert cpu_rows == banded_upscale._MIN_BAND_ROWS or cpu_rows * batch * width * dim * 4 <= 8 * 2**20
    assert banded_upscale.default_band_rows(1, width, dim, torch.device("cpu")) * width * dim * 4 <= 8 * 2**20
    assert 2 * width / gpu_rows <= 8


class LargeOutputs(TorchDispatchMode):
    """Records ops creating new tensors of at least `numel` elements (views and in-place results are not new)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            new = isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in storages
            if new and tensor.numel() >= self.numel:
                self.ops.append(str(func))
        return out


def test_banded_upscale_allocates_few_full_size_maps():
    # The point of the bands: forward and backward of a layer create only the sub-pixel map, the output and the
    # sub-pixel gradient at full size (the reference creates more than twice as many).
    block = make_model(num_upscale_blocks=1).upscale_block
    feature_map = torch.randn(2, 12, 5, TINY["hidden_size"], requires_grad=True)
    upstream = torch.randn(2, 24, 10, TINY["hidden_size"])
    with LargeOutputs(upstream.numel() // 3) as banded:
        banded_upscale.upscale_in_bands(block, feature_map, band_rows=4).backward(upstream)
    assert len(banded.ops) <= 3, banded.ops
    with LargeOutputs(upstream.numel() // 3) as plain:
        block(feature_map).backward(upstream)
    assert len(plain.ops) >= 6, plain.ops  # the counter sees what the bands avoid


def test_banded_upscale_differentiates_the_weights_forward_used():
    # Backward recomputes the bands with forward's weights; an in-place change of them before backward is caught, as
    # for stock modules.
    layer = make_model(num_upscale_blocks=1).upscale_block.block[0]
    feature_map = torch.randn(2, 4, 5, TINY["hidden_size"], requires_grad=True)
    output = banded_upscale.upscale_layer_in_bands(layer, feature_map, band_rows=2)
    with torch.no_grad():
        layer.conv2.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()


def test_banded_upscale_rejects_double_backward():
    block = make_model().upscale_block
    feature_map = torch.randn(1, 4, 5, TINY["hidden_size"], requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        output = banded_upscale.upscale_in_bands(block, feature_map).square().sum()
        torch.autograd.grad(output, feature_map, create_graph=True)
    # The reference supports it.
    (grad,) = torch.autograd.grad(block(feature_map).square().sum(), feature_map, create_graph=True)
    assert grad.requires_grad


@pytest.mark.parametrize("upscale_blocks", [1, 2])
def test_banded_inference_logits_equal_the_reference(upscale_blocks):
    block = make_model(num_upscale_blocks=upscale_blocks).upscale_block
    feature_map, queries = torch.randn(2, 4, 5, TINY["hidden_size"]), torch.randn(2, 6, TINY["hidden_size"])
    expected = compute_mask_logits(queries, block(feature_map))
    for rows in BAND_ROWS:
        got = banded_upscale.mask_logits_in_bands(block, feature_map, queries, band_rows=rows)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("upscale_blocks", [1, 2])
@pytest.mark.parametrize("height", [1, 3, 4])
@pytest.mark.parametrize("frozen", [(), ("conv2",), ("conv1", "conv2", "layernorm2d")])
def test_banded_prediction_logits_differentiate_like_the_reference(upscale_blocks, height, frozen):
    # A training prediction's pixel embeddings carry no gradient: mask logits, of all queries or of a subset (the
    # loss's matched ones), differentiate through the last upscale layer band by band.
    block = make_model(num_upscale_blocks=upscale_blocks).upscale_block
    for name, param in block.named_parameters():
        param.requires_grad_(name.split(".")[2] not in frozen)
    feature_map = torch.randn(2, height, 5, TINY["hidden_size"], requires_grad=True)
    queries = torch.randn(2, 6, TINY["hidden_size"], requires_grad=True)
    inputs = [t for t in [feature_map, queries, *block.parameters()] if t.requires_grad]
    subset = [4, 0]
    reference = block(feature_map)
    expected = [compute_mask_logits(queries, reference), compute_mask_logits(queries[:, subset], reference)]
    upstream = [torch.randn_like(logits) for logits in expected]
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    for rows in BAND_ROWS:
        prediction = banded_upscale.prediction_in_bands(block, feature_map, queries, None, band_rows=rows)
        assert not prediction.pixel_embeddings.requires_grad
        got = [prediction.mask_logits(), prediction.mask_logits(queries[:, subset])]
        for logits, want in zip(got, expected, strict=True):
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
        for grad, want in zip(torch.autograd.grad(got, inputs, upstream), expected_grads, strict=True):
            torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-4)


def test_predictions_share_one_pixel_map():
    # Each prediction overwrites the previous one's pixel embeddings; mask logits taken before that still
    # differentiate correctly, as their backward recomputes from the prediction's own sub-pixel map.
    block = make_model().upscale_block
    first_map = torch.randn(2, 3, 5, TINY["hidden_size"], requires_grad=True)
    second_map = torch.randn(2, 3, 5, TINY["hidden_size"])
    queries = torch.randn(2, 6, TINY["hidden_size"])
    first = banded_upscale.prediction_in_bands(block, first_map, queries, None)
    first_logits = first.mask_logits()
    second = banded_upscale.prediction_in_bands(block, second_map, queries, None, previous=first)
    assert second.pixel_embeddings.data_ptr() == first.pixel_embeddings.data_ptr()
    torch.testing.assert_close(second.mask_logits(), compute_mask_logits(queries, block(second_map)))
    upstream = torch.randn_like(first_logits)
    (got,) = torch.autograd.grad(first_logits, first_map, upstream)
    (want,) = torch.autograd.grad(compute_mask_logits(queries, block(first_map)), first_map, upstream)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="overwritten by a later prediction"):
        first.mask_logits()  # too late: its map now holds the second prediction


def test_a_training_forward_makes_one_pixel_map():
    # Every prediction of a training forward (one per query block and the final one) writes the same full-size
    # pixel-embedding map, and backward makes none.
    class NewMaps(TorchDispatchMode):
        def __init__(self, shape: tuple):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            storages = {t.untyped_storage().data_ptr() for t in inputs}
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape:
                    self.count += tensor.untyped_storage().data_ptr() not in storages
            return out

    model = make_model().train()
    model.set_upscale_implementation("banded", band_rows=2)
    labels = {"mask_labels": [torch.rand(2, 64, 64) > 0.5] * 2, "class_labels": [torch.tensor([0, 3])] * 2}
    with NewMaps((2, 16, 16, TINY["hidden_size"])) as maps:
        model(torch.randn(2, 3, 64, 64), **labels).loss.backward()
    assert maps.count == 1


@pytest.mark.parametrize("training", [False, True])
def test_model_outputs_and_gradients_equal_with_either_implementation(training):
    # The model's choice between the two paths changes nothing but memory: the same logits, loss and gradients.
    model = make_model().train(training)
    model.set_attn_mask_probs([1.0, 0.5])
    labels = {"mask_labels": [torch.rand(2, 64, 80) > 0.5] * 2, "class_labels": [torch.tensor([0, 3])] * 2}
    pixels = torch.randn(2, 3, 64, 80)
    results = []
    for implementation, rows in (("banded", 2), ("banded", None), ("reference", None)):
        model.set_upscale_implementation(implementation, band_rows=rows)
        model.zero_grad()
        torch.manual_seed(0)
        out = model(pixels, **labels, output_intermediate_predictions=True)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (expected, expected_grads), *others = results[::-1]
    for out, grads in others:
        torch.testing.assert_close(out.masks_queries_logits, expected.masks_queries_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
        for got, want in zip(out.intermediate_masks_queries_logits, expected.intermediate_masks_queries_logits):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, want in expected_grads.items():
            torch.testing.assert_close(grads[name], want, atol=1e-4, rtol=1e-4, msg=name)


def test_inference_equals_the_reference_head():
    model = make_model().eval()
    model.set_attn_mask_probs([0.0, 0.0])
    pixels = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        banded = model(pixels)
        model.set_upscale_implementation("reference")
        reference = model(pixels)
    torch.testing.assert_close(banded.masks_queries_logits, reference.masks_queries_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown upscale implementation"):
        model.set_upscale_implementation("fast")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_banded_prediction_under_autocast(dtype):
    # Backward recomputes each band under forward's autocast state: against float32 gradients, ours are about as
    # accurate as the reference's under the same autocast.
    block = make_model().upscale_block
    feature_map = torch.randn(2, 4, 5, TINY["hidden_size"], requires_grad=True)
    queries = torch.randn(2, 6, TINY["hidden_size"], requires_grad=True)
    inputs = [feature_map, queries, *block.parameters()]
    exact = compute_mask_logits(queries, block(feature_map))
    upstream = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, inputs, upstream)
    with torch.autocast("cpu", dtype=dtype):
        got = banded_upscale.prediction_in_bands(block, feature_map, queries, None, band_rows=2).mask_logits()
        expected = compute_mask_logits(queries, block(feature_map))
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    got_grads = torch.autograd.grad(got, inputs, upstream.to(dtype))
    stock_grads = torch.autograd.grad(expected, inputs, upstream.to(dtype))
    for ours_grad, stock_grad, exact_grad in zip(got_grads, stock_grads, exact_grads, strict=True):
        error = (ours_grad.float() - exact_grad).norm() / exact_grad.norm()
        stock_error = (stock_grad.float() - exact_grad).norm() / exact_grad.norm()
        assert error <= 1.5 * stock_error + 1e-3, (error, stock_error)
