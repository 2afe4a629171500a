"""EomtForUniversalSegmentation: parity with transformers' built-in EoMT (the oracle), interop, any size, loss."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForUniversalSegmentation

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation
from modeling_eomt.modeling import EomtScaleBlock

# Oracle: the EoMT that ships inside transformers (imported explicitly, only here in tests).
BuiltinConfig = transformers.models.eomt.EomtConfig
BuiltinModel = transformers.models.eomt.EomtForUniversalSegmentation

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_blocks": 2,
    "image_size": 64,
    "patch_size": 16,
    "num_queries": 6,
    "num_labels": 5,
    "num_register_tokens": 2,
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (layer scales, registers, norms included) a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def make_pair(attn: str = "sdpa", **overrides):
    config_kwargs = {**TINY, **overrides}
    ours = EomtForUniversalSegmentation(EomtConfig(**config_kwargs, attn_implementation=attn))
    randomize(ours)
    builtin = BuiltinModel(BuiltinConfig(**config_kwargs, attn_implementation=attn))
    missing, unexpected = builtin.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, builtin


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_eval_logits_match_builtin(attn, swiglu):
    ours, builtin = make_pair(attn, use_swiglu_ffn=swiglu)
    ours.attn_mask_probs.zero_()
    builtin.attn_mask_probs.zero_()
    ours.eval(), builtin.eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(pixels), builtin(pixels)
    torch.testing.assert_close(a.class_queries_logits, b.class_queries_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.masks_queries_logits, b.masks_queries_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_masked_attention_logits_match_builtin(attn):
    ours, builtin = make_pair(attn)
    ours.train(), builtin.train()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(pixels), builtin(pixels)
    torch.testing.assert_close(a.class_queries_logits, b.class_queries_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.masks_queries_logits, b.masks_queries_logits, atol=1e-5, rtol=0)
    # Masking really changes the result: without it the logits differ.
    ours.attn_mask_probs.zero_()
    with torch.no_grad():
        unmasked = ours(pixels)
    assert not torch.allclose(unmasked.masks_queries_logits, a.masks_queries_logits, atol=1e-3)


@pytest.mark.parametrize("swiglu", [False, True])
def test_masked_attention_gradients_match_builtin(swiglu):
    # Backward through masked attention, the head and the activations recomputed in backward: every parameter's
    # gradient of a fixed function of the outputs equals the built-in's.
    ours, builtin = make_pair(use_swiglu_ffn=swiglu)
    ours.train(), builtin.train()
    pixels = torch.randn(2, 3, 64, 64)
    generator = torch.Generator().manual_seed(1)
    grads = []
    for model in (ours, builtin):
        out = model(pixels)
        mask_weights = torch.randn(out.masks_queries_logits.shape, generator=generator)
        class_weights = torch.randn(out.class_queries_logits.shape, generator=generator)
        ((out.masks_queries_logits * mask_weights).sum() + (out.class_queries_logits * class_weights).sum()).backward()
        grads.append({name: param.grad for name, param in model.named_parameters() if param.grad is not None})
        generator.manual_seed(1)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 30
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_loss_value_matches_builtin():
    # Same weights and targets, masked attention on (probabilities 1: no random release). The loss reads masks at
    # random points, drawn differently by the two implementations, so agreement is up to sampling noise (~0.3 %).
    torch.manual_seed(0)
    ours, builtin = make_pair(train_num_points=12544)
    ours.train(), builtin.train()
    pixels = torch.randn(2, 3, 64, 64)
    masks = [(torch.rand(3, 4, 4) > 0.5).repeat_interleave(16, 1).repeat_interleave(16, 2) for _ in range(2)]
    labels = {
        "mask_labels": [m.float() for m in masks],
        "class_labels": [torch.tensor([0, 3, 4]), torch.tensor([1, 1, 2])],
    }
    ours_loss, builtin_loss = ours(pixels, **labels).loss, builtin(pixels, **labels).loss
    assert abs(ours_loss.item() - builtin_loss.item()) < 0.01 * builtin_loss.item()


def test_eager_and_sdpa_agree_with_masking():
    eager, _ = make_pair("eager")
    sdpa = EomtForUniversalSegmentation(EomtConfig(**TINY, attn_implementation="sdpa"))
    sdpa.load_state_dict(eager.state_dict())
    eager.train(), sdpa.train()
    pixels = torch.randn(1, 3, 64, 64)
    out = eager(pixels, output_attentions=True)
    torch.testing.assert_close(out.masks_queries_logits, sdpa(pixels).masks_queries_logits, atol=1e-5, rtol=0)
    assert len(out.attentions) == TINY["num_hidden_layers"]
    assert torch.allclose(out.attentions[-1].sum(-1), torch.ones(()), atol=1e-5)


def test_builtin_folder_loads_into_ours_and_back(tmp_path):
    _, builtin = make_pair()
    builtin.save_pretrained(tmp_path / "builtin")
    ours, info = EomtForUniversalSegmentation.from_pretrained(tmp_path / "builtin", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    for name, tensor in builtin.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name

    ours.attn_mask_probs.fill_(0.25)  # the annealing state is saved with the model
    ours.save_pretrained(tmp_path / "ours")
    back, info = BuiltinModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.allclose(back.attn_mask_probs, torch.full((2,), 0.25))
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(builtin.state_dict())


def test_auto_classes_resolve_to_ours(tmp_path):
    ours, _ = make_pair()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "eomt"
    assert type(AutoConfig.from_pretrained(tmp_path)) is EomtConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is EomtForUniversalSegmentation
    loaded = AutoModelForUniversalSegmentation.from_pretrained(tmp_path)
    assert type(loaded) is EomtForUniversalSegmentation
    pixels = torch.randn(1, 3, 64, 64)
    ours.eval()
    torch.testing.assert_close(loaded(pixels).class_queries_logits, ours(pixels).class_queries_logits)


def test_registration_is_idempotent():
    import modeling_eomt

    modeling_eomt.register_auto_classes()
    modeling_eomt.register_auto_classes()
    assert AutoModelForUniversalSegmentation._model_mapping[EomtConfig] is EomtForUniversalSegmentation


def test_legacy_swiglu_names_load(tmp_path):
    ours, _ = make_pair(use_swiglu_ffn=True)
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    legacy = {}
    for name, tensor in state.items():
        if ".mlp.gate_proj." in name:
            up = state[name.replace("gate_proj", "up_proj")]
            legacy[name.replace("gate_proj", "weights_in")] = torch.cat([tensor, up])
        elif ".mlp.up_proj." not in name:
            legacy[name.replace("mlp.down_proj", "mlp.weights_out")] = tensor
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = EomtForUniversalSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_any_input_size_and_exact_at_native_size():
    ours, _ = make_pair()
    ours.eval()
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 48, 96))
        assert out.masks_queries_logits.shape == (1, 6, 12, 24)
        native = ours.embeddings.position_embeddings_for((4, 4))
    assert torch.equal(native[0], ours.embeddings.position_embeddings.weight)


def test_position_interpolation_is_smooth_resampling():
    model = EomtForUniversalSegmentation(EomtConfig(**{**TINY, "image_size": 128}))
    # A position table linear in the grid coordinates stays linear (away from the borders) when resampled.
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    table = torch.stack([rows, cols], -1).reshape(64, 2).repeat(1, 16)
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.copy_(table)
        resampled = model.embeddings.position_embeddings_for((16, 16))[0].reshape(16, 16, -1)
    row_steps = resampled[4:12, :, 0].diff(dim=0)
    assert torch.allclose(row_steps, torch.full_like(row_steps, 0.5), atol=1e-4)


def seeded_training_step(model, pixels, labels, call=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one training forward and backward with the random draws seeded, through
    `call` (e.g. a compiled `model`; default the model itself)."""
    model.zero_grad()
    torch.manual_seed(0)
    loss = (model if call is None else call)(pixels, **labels).loss
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and len(expected) > 20
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    ours, _ = make_pair()
    pixels = torch.randn(3, 3, 64, 64)
    # The third image has no target: its queries get no mask terms.
    labels = {
        "mask_labels": [torch.rand(2, 64, 64) > 0.5] * 2 + [torch.zeros(0, 64, 64)],
        "class_labels": [torch.tensor([0, 3])] * 2 + [torch.zeros(0, dtype=torch.long)],
    }
    ours.train()
    ours.attn_mask_probs.fill_(1.0)

    upscale_calls = []
    upscale = EomtScaleBlock.forward

    # Counted in forward itself: module hooks do not fire when checkpointing recomputes in backward.
    def counted(self, *args, **kwargs):
        upscale_calls.append(1)
        return upscale(self, *args, **kwargs)

    monkeypatch.setattr(EomtScaleBlock, "forward", counted)
    _, plain = seeded_training_step(ours, pixels, labels)
    assert upscale_calls == []  # the banded head runs the layers itself
    ours.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _, checkpointed = seeded_training_step(ours, pixels, labels)
    predictions = TINY["num_blocks"] + 1
    assert len(upscale_calls) == 2 * predictions  # the upscaled maps are recomputed in backward
    assert_same_gradients(checkpointed, plain)


def test_activation_checkpointing_replaces_the_selective_recompute(monkeypatch):
    # Inside a checkpointed layer a second, selective checkpoint would keep its matmul outputs alive until
    # backward — exactly what activation checkpointing is there to drop.
    from modeling_eomt import modeling

    ours, _ = make_pair()
    ours.train()
    contexts = []
    keep = modeling._KEEP_MATMUL_OUTPUTS
    monkeypatch.setattr(modeling, "_KEEP_MATMUL_OUTPUTS", lambda: contexts.append(1) or keep())
    labels = {"mask_labels": [torch.rand(2, 64, 64) > 0.5], "class_labels": [torch.tensor([0, 3])]}
    ours(torch.randn(1, 3, 64, 64), **labels).loss.backward()
    assert len(contexts) == TINY["num_hidden_layers"]  # one selective checkpoint per MLP
    contexts.clear()
    ours.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ours(torch.randn(1, 3, 64, 64), **labels).loss.backward()
    assert contexts == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_step_under_autocast(dtype):
    # Autocast caches weight casts across the head's repeated calls; the selective recompute must not trip on it.
    ours, _ = make_pair()
    ours.train()
    labels = {"mask_labels": [torch.rand(2, 64, 64) > 0.5] * 2, "class_labels": [torch.tensor([0, 3])] * 2}
    with torch.autocast("cpu", dtype=dtype):
        loss = ours(torch.randn(2, 3, 64, 64), **labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_every_parameter_gets_a_gradient_without_targets():
    # DDP without `find_unused_parameters` needs a gradient for every parameter, even on a batch with no segments.
    ours, _ = make_pair()
    ours.train()
    empty = {"mask_labels": [torch.zeros(0, 64, 64)] * 2, "class_labels": [torch.zeros(0, dtype=torch.long)] * 2}
    ours(torch.randn(2, 3, 64, 64), **empty).loss.backward()
    missing = [name for name, p in ours.named_parameters() if p.grad is None]
    assert missing == []


def reference_upscale(block: EomtScaleBlock, feature_map: torch.Tensor) -> torch.Tensor:
    """The upscale block as stock NCHW modules compute it (ConvTranspose2d, activation, Conv2d, LayerNorm)."""
    hidden = feature_map.permute(0, 3, 1, 2)
    for layer in block.block:
        hidden = layer.conv2(layer.activation(layer.conv1(hidden)))
        hidden = layer.layernorm2d(hidden.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return hidden.permute(0, 2, 3, 1)


@pytest.mark.parametrize("upscale_blocks", [1, 2])
@pytest.mark.parametrize("height", [1, 3, 4, 5])
@pytest.mark.parametrize("frozen", [(), ("conv2",), ("conv1", "layernorm2d")])
def test_banded_upscale_equals_the_stock_modules(monkeypatch, upscale_blocks, height, frozen):
    # Forward and backward run a band of rows at a time; bands of one and two coarse rows and whole-map bands, on
    # maps of odd and even heights, exercise every border; frozen parameters get no gradient and change nothing else.
    from modeling_eomt import modeling

    torch.manual_seed(0)
    ours, _ = make_pair(num_upscale_blocks=upscale_blocks)
    block = ours.upscale_block
    for name, param in block.named_parameters():
        param.requires_grad_(name.split(".")[2] not in frozen)
    feature_map = torch.randn(2, height, 5, TINY["hidden_size"], requires_grad=True)
    inputs = [feature_map] + [p for p in block.parameters() if p.requires_grad]
    expected = reference_upscale(block, feature_map)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    monkeypatch.setattr(modeling, "_BAND_ELEMENTS", 1)
    for rows in (2, 4, 64):
        monkeypatch.setattr(modeling, "_MIN_BAND_ROWS", rows)
        banded = block(feature_map)
        torch.testing.assert_close(banded, expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(torch.autograd.grad(banded, inputs, upstream), expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_band_sizes_follow_the_device():
    # CPU: bands of a few MB, reused from the heap and cached; accelerators: a few large bands, fewer kernel launches.
    from modeling_eomt import modeling

    batch, width, dim = 16, 160, 384  # ViT-S at 640, a GPU-sized batch
    cpu_rows = modeling._band_rows(batch, width, dim, torch.device("cpu"))
    gpu_rows = modeling._band_rows(batch, width, dim, torch.device("cuda"))
    assert cpu_rows == modeling._MIN_BAND_ROWS or cpu_rows * batch * width * dim * 4 <= 8 * 2**20
    assert modeling._band_rows(1, width, dim, torch.device("cpu")) * width * dim * 4 <= 8 * 2**20
    assert 2 * width / gpu_rows <= 8


def test_banded_upscale_allocates_few_full_size_maps(monkeypatch):
    # The point of the bands: forward and backward of a layer create only the sub-pixel map, the output and the
    # sub-pixel gradient at full size (stock modules create more than twice as many: activation, conv, norm, their
    # gradients).
    from torch.utils._python_dispatch import TorchDispatchMode

    from modeling_eomt import modeling

    class LargeOutputs(TorchDispatchMode):
        def __init__(self, numel: int):
            super().__init__()
            self.numel, self.ops = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            storages = {t.untyped_storage().data_ptr() for t in inputs}
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                new = isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in storages
                if new and tensor.numel() >= self.numel:  # views and in-place results are not new maps
                    self.ops.append(str(func))
            return out

    monkeypatch.setattr(modeling, "_BAND_ELEMENTS", 1)
    monkeypatch.setattr(modeling, "_MIN_BAND_ROWS", 4)  # bands of two coarse rows
    ours, _ = make_pair()
    layer = ours.upscale_block.block[0]
    feature_map = torch.randn(2, 12, 5, TINY["hidden_size"], requires_grad=True)
    upstream = torch.randn(2, 24, 10, TINY["hidden_size"])
    with LargeOutputs(upstream.numel() // 3) as counted:
        layer(feature_map).backward(upstream)
    assert len(counted.ops) <= 3, counted.ops
    single = ours.upscale_block
    single.block = torch.nn.ModuleList([layer])
    with LargeOutputs(upstream.numel() // 3) as plain:
        reference_upscale(single, feature_map).backward(upstream)
    assert len(plain.ops) >= 6, plain.ops  # the counter sees what the bands avoid


def test_banded_upscale_differentiates_the_weights_forward_used():
    # Backward recomputes the bands: with the weights of forward (here swapped in by functional_call), and an
    # in-place change of them before backward is caught, as for stock modules.
    torch.manual_seed(0)
    ours, _ = make_pair()
    layer = ours.upscale_block.block[0]
    feature_map = torch.randn(2, 4, 5, TINY["hidden_size"], requires_grad=True)
    swapped = {name: 3 * param.detach() for name, param in layer.named_parameters()}
    got = torch.func.functional_call(layer, swapped, (feature_map,))
    (got_grad,) = torch.autograd.grad(got.square().sum(), feature_map)
    reference = EomtScaleBlock(ours.config)
    reference.block = torch.nn.ModuleList([type(layer)(ours.config)])
    reference.block[0].load_state_dict(swapped)
    expected = reference_upscale(reference, feature_map)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), feature_map)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-4, rtol=1e-4)

    output = layer(feature_map)
    with torch.no_grad():
        layer.conv2.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()


def test_banded_upscale_rejects_double_backward():
    ours, _ = make_pair()
    feature_map = torch.randn(1, 4, 5, TINY["hidden_size"], requires_grad=True)
    (grad,) = torch.autograd.grad(ours.upscale_block(feature_map).square().sum(), feature_map, create_graph=False)
    assert grad.shape == feature_map.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ours.upscale_block(feature_map).square().sum(), feature_map, create_graph=True)


@pytest.mark.parametrize("upscale_blocks", [1, 2])
def test_banded_inference_equals_the_stock_head(monkeypatch, upscale_blocks):
    from modeling_eomt import modeling

    ours, _ = make_pair(num_upscale_blocks=upscale_blocks)
    ours.eval()
    ours.attn_mask_probs.zero_()
    with torch.no_grad():
        tokens = ours(torch.randn(2, 3, 64, 80)).last_hidden_state
        queries, feature_map = ours._split_tokens(tokens, (4, 5))
        expected = torch.einsum(
            "bqd,bhwd->bqhw", ours.mask_head(queries), reference_upscale(ours.upscale_block, feature_map)
        )
        monkeypatch.setattr(modeling, "_BAND_ELEMENTS", 1)
        for rows in (2, 4, 64):
            monkeypatch.setattr(modeling, "_MIN_BAND_ROWS", rows)
            classes, masks = ours.predict_in_bands(tokens, (4, 5))
            torch.testing.assert_close(masks, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(classes, ours.class_predictor(queries))


def head_inputs(model: EomtForUniversalSegmentation, height: int, seed: int = 0) -> tuple[torch.Tensor, tuple]:
    """Random normalised tokens `[queries | prefix | patches]` of a (height × 5)-patch image, batch 2."""
    generator = torch.Generator().manual_seed(seed)
    length = TINY["num_queries"] + model.embeddings.num_prefix_tokens + height * 5
    tokens = torch.randn(2, length, TINY["hidden_size"], generator=generator).requires_grad_()
    return tokens, (height, 5)


def stock_head_logits(model: EomtForUniversalSegmentation, tokens: torch.Tensor, grid: tuple, queries=None):
    """Mask logits through stock modules: mask embeddings (all, or the query indices given) · `reference_upscale`."""
    query_tokens, feature_map = model._split_tokens(tokens, grid)
    mask_embeddings = model.mask_head(query_tokens)
    mask_embeddings = mask_embeddings if queries is None else mask_embeddings[:, queries]
    return torch.einsum("bqd,bhwd->bqhw", mask_embeddings, reference_upscale(model.upscale_block, feature_map))


@pytest.mark.parametrize("upscale_blocks", [1, 2])
@pytest.mark.parametrize("height", [1, 3, 4])
@pytest.mark.parametrize(
    "frozen", [(), ("conv2",), ("conv1", "conv2", "layernorm2d"), ("conv1", "conv2", "layernorm2d", "tokens")]
)
def test_head_mask_logits_differentiate_like_the_stock_modules(monkeypatch, upscale_blocks, height, frozen):
    # In training the head's pixel embeddings carry no gradient: mask logits, of all queries or of a subset (the
    # loss's matched ones), differentiate through the last upscale layer band by band. Their values and the
    # gradients of the tokens and of every trainable weight equal those through stock modules, with bands of one
    # and two coarse rows and whole-map bands; with the tokens and the upscale block frozen, only the mask
    # embeddings need a gradient.
    from modeling_eomt import modeling

    ours, _ = make_pair(num_upscale_blocks=upscale_blocks)
    for name, param in ours.upscale_block.named_parameters():
        param.requires_grad_(name.split(".")[2] not in frozen)
    tokens, grid = head_inputs(ours, height)
    tokens.requires_grad_("tokens" not in frozen)
    trainable = [*ours.upscale_block.parameters(), *ours.mask_head.parameters()]
    inputs = [t for t in [tokens, *trainable] if t.requires_grad]
    subset = [4, 0]
    expected = [stock_head_logits(ours, tokens, grid), stock_head_logits(ours, tokens, grid, subset)]
    upstream = [torch.randn_like(logits) for logits in expected]
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    monkeypatch.setattr(modeling, "_BAND_ELEMENTS", 1)
    for rows in (2, 4, 64):
        monkeypatch.setattr(modeling, "_MIN_BAND_ROWS", rows)
        prediction = ours.head(tokens, grid)
        assert not prediction.pixel_embeddings.requires_grad
        got = [prediction.mask_logits(), prediction.mask_logits(prediction.mask_embeddings[:, subset])]
        for logits, want in zip(got, expected, strict=True):
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
        for grad, want in zip(torch.autograd.grad(got, inputs, upstream), expected_grads, strict=True):
            torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-4)


def test_predictions_of_a_forward_share_one_pixel_map():
    # Each prediction overwrites the previous one's pixel embeddings; mask logits taken before that still
    # differentiate correctly afterwards, as their backward recomputes from the prediction's own sub-pixel map.
    ours, _ = make_pair()
    tokens, grid = head_inputs(ours, 3)
    other, _ = head_inputs(ours, 3, seed=1)
    first = ours.head(tokens, grid)
    first_logits = first.mask_logits()
    second = ours.head(other, grid, first)
    assert second.pixel_embeddings.data_ptr() == first.pixel_embeddings.data_ptr()
    torch.testing.assert_close(second.mask_logits(), stock_head_logits(ours, other, grid), atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(first_logits)
    (got,) = torch.autograd.grad(first_logits, tokens, upstream)
    (want,) = torch.autograd.grad(stock_head_logits(ours, tokens, grid), tokens, upstream)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="overwritten by a later prediction"):
        first.mask_logits()  # too late: its map now holds the second prediction


def test_a_training_forward_makes_one_pixel_map(monkeypatch):
    # Every prediction of a training forward (here 3: one per query block and the final one) writes the same
    # full-size pixel-embedding map, and backward makes none (bands of one coarse row, so band tensors are small).
    from torch.utils._python_dispatch import TorchDispatchMode

    from modeling_eomt import modeling

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

    monkeypatch.setattr(modeling, "_BAND_ELEMENTS", 1)
    monkeypatch.setattr(modeling, "_MIN_BAND_ROWS", 2)
    ours, _ = make_pair()
    ours.train()
    labels = {"mask_labels": [torch.rand(2, 64, 64) > 0.5] * 2, "class_labels": [torch.tensor([0, 3])] * 2}
    with NewMaps((2, 16, 16, TINY["hidden_size"])) as maps:
        ours(torch.randn(2, 3, 64, 64), **labels).loss.backward()
    assert maps.count == 1


def test_intermediate_predictions_equal_the_stock_head_on_the_hidden_states():
    # The predictions before each query block, taken from the shared map as they are made, equal a stock head run on
    # the (normalised) tokens those blocks receive, queries included.
    ours, _ = make_pair()
    ours.train()
    out = ours(torch.randn(2, 3, 64, 64), output_hidden_states=True, output_intermediate_predictions=True)
    first = ours.first_query_layer
    for block, (class_logits, mask_logits) in enumerate(
        zip(out.intermediate_class_queries_logits, out.intermediate_masks_queries_logits, strict=True)
    ):
        tokens = out.hidden_states[first + block]
        if block == 0:  # the queries join right before the first query block
            tokens = torch.cat([ours.query.weight[None].expand(2, -1, -1), tokens], dim=1)
        tokens = ours.layernorm(tokens)
        torch.testing.assert_close(mask_logits, stock_head_logits(ours, tokens, (4, 4)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(class_logits, ours.class_predictor(tokens[:, : TINY["num_queries"]]))


def test_head_mask_logits_under_autocast(monkeypatch):
    # Backward recomputes each band under forward's autocast state: against float32 gradients, ours are about as
    # accurate as stock modules' under the same autocast.
    from modeling_eomt import modeling

    monkeypatch.setattr(modeling, "_BAND_ELEMENTS", 1)
    monkeypatch.setattr(modeling, "_MIN_BAND_ROWS", 2)
    ours, _ = make_pair()
    tokens, grid = head_inputs(ours, 4)
    inputs = [tokens, *ours.upscale_block.parameters(), *ours.mask_head.parameters()]
    exact = stock_head_logits(ours, tokens, grid)
    upstream = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, inputs, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours.head(tokens, grid).mask_logits()
        expected = stock_head_logits(ours, tokens, grid)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    got_grads = torch.autograd.grad(got, inputs, upstream.bfloat16())
    stock_grads = torch.autograd.grad(expected, inputs, upstream.bfloat16())
    for ours_grad, stock_grad, exact_grad in zip(got_grads, stock_grads, exact_grads, strict=True):
        error = (ours_grad.float() - exact_grad).norm() / exact_grad.norm()
        stock_error = (stock_grad.float() - exact_grad).norm() / exact_grad.norm()
        assert error <= 1.5 * stock_error + 1e-3, (error, stock_error)


def test_banded_upscale_under_autocast():
    # Backward recomputes each band under the forward's autocast state, so it differentiates what forward computed.
    torch.manual_seed(0)
    ours, _ = make_pair()
    block = ours.upscale_block
    feature_map = torch.randn(2, 4, 5, TINY["hidden_size"], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        banded = block(feature_map)
        expected = reference_upscale(block, feature_map)
    upstream = torch.randn_like(expected)
    got = torch.autograd.grad(banded, [feature_map, *block.parameters()], upstream)
    want = torch.autograd.grad(expected, [feature_map, *block.parameters()], upstream)
    assert banded.dtype == expected.dtype
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_masked_attention_runs_in_inference_mode():
    # An unannealed model (probabilities 1) predicts before every query block even under inference_mode, whose
    # tensors have no version counter; the result equals a no_grad forward.
    ours, _ = make_pair()
    ours.eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        inference = ours(pixels).masks_queries_logits
    with torch.no_grad():
        torch.testing.assert_close(inference, ours(pixels).masks_queries_logits)


def test_inference_makes_no_intermediate_predictions():
    ours, _ = make_pair()
    ours.eval()
    ours.attn_mask_probs.zero_()
    calls = []
    ours.mask_head.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 64, 64))
    assert len(calls) == 1 and out.intermediate_masks_queries_logits is None
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 64, 64), output_intermediate_predictions=True)
    assert len(out.intermediate_masks_queries_logits) == TINY["num_blocks"]


def test_loss_handles_empty_targets_and_decreases():
    torch.manual_seed(0)
    model = EomtForUniversalSegmentation(EomtConfig(**{**TINY, "train_num_points": 256}))
    model.train()
    pixels = torch.randn(2, 3, 64, 64)
    square = torch.zeros(1, 64, 64, dtype=torch.bool)
    square[:, 16:48, 16:48] = True
    labels = {
        "mask_labels": [square, torch.zeros(0, 64, 64)],
        "class_labels": [torch.tensor([2]), torch.zeros(0, dtype=torch.long)],
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(pixels, **labels)
        assert set(out.loss_dict) == {"loss_cross_entropy", "loss_mask", "loss_dice"}
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_loss_sums_over_every_block_prediction():
    model = EomtForUniversalSegmentation(EomtConfig(**TINY))
    model.train()
    labels = {"mask_labels": [torch.rand(2, 64, 64) > 0.5], "class_labels": [torch.tensor([1, 4])]}
    out = model(torch.randn(1, 3, 64, 64), **labels)
    assert out.intermediate_masks_queries_logits is None  # only on request
    out = model(torch.randn(1, 3, 64, 64), **labels, output_intermediate_predictions=True)
    assert len(out.intermediate_masks_queries_logits) == TINY["num_blocks"]
    # With no targets, only the no-object CE remains: num_blocks + 1 times the final block's share.
    empty = {"mask_labels": [torch.zeros(0, 64, 64)], "class_labels": [torch.zeros(0, dtype=torch.long)]}
    model.attn_mask_probs.zero_()
    out = model(torch.randn(1, 3, 64, 64), **empty, output_intermediate_predictions=True)
    per_prediction = [
        2.0 * torch.nn.functional.cross_entropy(logits[0], torch.full((6,), 5))
        for logits in (*out.intermediate_class_queries_logits, out.class_queries_logits)
    ]
    torch.testing.assert_close(out.loss, sum(per_prediction))


@pytest.mark.parametrize(
    "pixels, labels, message",
    [
        (torch.randn(3, 64, 64), {}, "4D"),
        (torch.randn(1, 4, 64, 64), {}, "channels"),
        (torch.randn(1, 3, 8, 8), {}, "patch"),
        (
            torch.randn(1, 3, 64, 64),
            {"mask_labels": [torch.ones(2, 64, 64)], "class_labels": [torch.tensor([1])]},
            "class labels",
        ),
        (
            torch.randn(1, 3, 64, 64),
            {"mask_labels": [torch.ones(1, 64, 64)], "class_labels": [torch.tensor([5])]},
            "num_labels",
        ),
        (torch.randn(1, 3, 64, 64), {"mask_labels": [torch.ones(1, 64, 64)]}, "both"),
    ],
)
def test_bad_input_names_the_problem(pixels, labels, message):
    model = EomtForUniversalSegmentation(EomtConfig(**TINY))
    with pytest.raises(ValueError, match=message):
        model(pixels, **labels)


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = EomtForUniversalSegmentation(EomtConfig(**{**TINY, "drop_path_rate": 0.5}))
    model.attn_mask_probs.zero_()
    pixels = torch.randn(2, 3, 64, 64)
    model.train()
    torch.manual_seed(0)
    first = model(pixels).class_queries_logits
    second = model(pixels).class_queries_logits
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(pixels).class_queries_logits, model(pixels).class_queries_logits)


@pytest.mark.filterwarnings("error:Dynamo does not know how to trace")
def test_compiled_training_step_matches_eager():
    # torch.compile traces the head's shared pixel map through functionalization, which does not keep eager's
    # version counts: the overwritten-map check must not misfire there. `aot_eager` runs that tracing without
    # generating code, and draws the loss's random points as eager does. The matcher's solver is skipped by dynamo,
    # not traced into with a warning.
    ours, _ = make_pair()
    ours.train()
    labels = {"mask_labels": [torch.rand(2, 64, 64) > 0.5] * 2, "class_labels": [torch.tensor([0, 3])] * 2}
    pixels = torch.randn(2, 3, 64, 64)

    torch._dynamo.reset()
    eager_loss, eager_grads = seeded_training_step(ours, pixels, labels)
    compiled = torch.compile(ours, backend="aot_eager")
    compiled_loss, compiled_grads = seeded_training_step(ours, pixels, labels, compiled)
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert_same_gradients(compiled_grads, eager_grads)


def test_compiled_inference_matches_eager_and_follows_the_annealing_buffer():
    ours, _ = make_pair()
    ours.eval()
    pixels = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager")
    outputs = {}
    for probs in (0.0, 1.0):  # annealed, then masking again: the compiled model must notice the change
        ours.attn_mask_probs.fill_(probs)
        with torch.no_grad():
            eager, outputs[probs] = ours(pixels), compiled(pixels)
        torch.testing.assert_close(outputs[probs].class_queries_logits, eager.class_queries_logits)
        torch.testing.assert_close(outputs[probs].masks_queries_logits, eager.masks_queries_logits)
    assert not torch.allclose(outputs[0.0].masks_queries_logits, outputs[1.0].masks_queries_logits)


def test_masking_follows_the_annealing_buffer_without_reading_it_every_forward():
    from torch.utils._python_dispatch import TorchDispatchMode

    ours, _ = make_pair()
    ours.eval()
    heads = []
    ours.mask_head.register_forward_hook(lambda *args: heads.append(1))

    def masking_blocks() -> int:
        heads.clear()
        with torch.no_grad():
            ours(torch.randn(1, 3, 64, 64))
        return len(heads) - 1  # the final prediction is always made

    assert masking_blocks() == TINY["num_blocks"]
    ours.attn_mask_probs.fill_(0.0)
    assert masking_blocks() == 0
    ours.attn_mask_probs[1] = 0.5
    assert masking_blocks() == 1
    ours.load_state_dict({**ours.state_dict(), "attn_mask_probs": torch.ones(TINY["num_blocks"])})
    assert masking_blocks() == TINY["num_blocks"]

    # Annealed and read once, the buffer is not touched by later forwards, and nothing else is read back to the host
    # (`_local_scalar_dense`, behind `bool(tensor)` and `.item()`): on an accelerator each would be a synchronisation.
    ours.attn_mask_probs.zero_()
    masking_blocks()
    probs = ours.attn_mask_probs.data_ptr()
    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            if func is torch.ops.aten._local_scalar_dense.default or any(t.data_ptr() == probs for t in tensors):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    with Reads():
        assert masking_blocks() == 0
    assert reads == []
