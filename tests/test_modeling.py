"""EomtForUniversalSegmentation: parity with transformers' built-in EoMT (the oracle), interop, any size, loss."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_eomt import TINY, stock_logits
from transformers import AutoConfig, AutoModel, AutoModelForUniversalSegmentation

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation
from modeling_eomt.modeling import EomtScaleBlock

# Oracle: the EoMT that ships inside transformers (imported explicitly, only here in tests).
BuiltinConfig = transformers.models.eomt.EomtConfig
BuiltinModel = transformers.models.eomt.EomtForUniversalSegmentation


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
    ours.set_attn_mask_probs([0.0] * TINY["num_blocks"])
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
    from modeling_eomt import recompute

    ours, _ = make_pair()
    ours.train()
    contexts = []
    keep = recompute._KEEP_MATMUL_OUTPUTS
    monkeypatch.setattr(recompute, "_KEEP_MATMUL_OUTPUTS", lambda: contexts.append(1) or keep())
    labels = {"mask_labels": [torch.rand(2, 64, 64) > 0.5], "class_labels": [torch.tensor([0, 3])]}
    ours(torch.randn(1, 3, 64, 64), **labels).loss.backward()
    assert contexts == []  # an option, off by default
    ours.set_selective_recompute(True)
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


def test_fresh_queries_start_at_unit_scale_as_in_the_builtin_and_the_original():
    # The original release leaves its `nn.Embedding` queries at torch's default N(0, 1); so does the built-in's init.
    # Queries at the 0.02 of the other weights collapse to one token in a pretrained backbone's blocks.
    config = {**TINY, "num_queries": 200}
    torch.manual_seed(0)
    ours = EomtForUniversalSegmentation(EomtConfig(**config)).query.weight
    builtin = BuiltinModel(BuiltinConfig(**config)).query.weight
    assert abs(ours.std().item() - 1.0) < 0.05 and abs(builtin.std().item() - 1.0) < 0.05
    assert abs(ours.mean().item()) < 0.05


def test_queries_missing_from_a_checkpoint_start_at_unit_scale(tmp_path):
    # Loading initialises only what the file lacks: the model's own buffers are loaded, the queries are not.
    model = EomtForUniversalSegmentation(EomtConfig(**{**TINY, "num_queries": 200}))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["query.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = EomtForUniversalSegmentation.from_pretrained(tmp_path, allow_missing_weights=True)
    assert abs(loaded.query.weight.std().item() - 1.0) < 0.05
    torch.testing.assert_close(loaded.class_predictor.weight, model.class_predictor.weight)


def test_every_parameter_gets_a_gradient_without_targets():
    # DDP without `find_unused_parameters` needs a gradient for every parameter, even on a batch with no segments.
    ours, _ = make_pair()
    ours.train()
    empty = {"mask_labels": [torch.zeros(0, 64, 64)] * 2, "class_labels": [torch.zeros(0, dtype=torch.long)] * 2}
    ours(torch.randn(2, 3, 64, 64), **empty).loss.backward()
    missing = [name for name, p in ours.named_parameters() if p.grad is None]
    assert missing == []


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
    ours.set_attn_mask_probs([0.0] * TINY["num_blocks"])
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
    model.set_attn_mask_probs([0.0] * TINY["num_blocks"])
    out = model(torch.randn(1, 3, 64, 64), **empty, output_intermediate_predictions=True)
    per_prediction = [
        2.0 * torch.nn.functional.cross_entropy(logits[0], torch.full((6,), 5))
        for logits in (*out.intermediate_class_queries_logits, out.class_queries_logits)
    ]
    torch.testing.assert_close(out.loss, sum(per_prediction))


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


def test_drop_path_drops_whole_branches_per_sample_and_rescales_the_rest():
    # Stochastic depth (timm's drop_path): each sample keeps its branch with probability 1 − rate, scaled by
    # 1 / (1 − rate), so the expectation is the undropped branch.
    layer = EomtForUniversalSegmentation(EomtConfig(**{**TINY, "drop_path_rate": 0.25})).layers[0].train()
    branch = torch.ones(4000, 3, TINY["hidden_size"])
    torch.manual_seed(0)
    out = layer.add_branch(torch.zeros_like(branch), branch, layer.layer_scale1)
    scale = layer.layer_scale1.lambda1
    per_sample = out / scale
    kept = per_sample[:, 0, 0] != 0
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))
    assert (per_sample[~kept] == 0).all()
    assert abs(kept.float().mean().item() - 0.75) < 0.03


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
        ours.set_attn_mask_probs([probs] * TINY["num_blocks"])
        with torch.no_grad():
            eager, outputs[probs] = ours(pixels), compiled(pixels)
        torch.testing.assert_close(outputs[probs].class_queries_logits, eager.class_queries_logits)
        torch.testing.assert_close(outputs[probs].masks_queries_logits, eager.masks_queries_logits)
    assert not torch.allclose(outputs[0.0].masks_queries_logits, outputs[1.0].masks_queries_logits)


def test_masking_follows_the_annealing_buffer_at_the_documented_moments():
    # Which blocks mask is read from `attn_mask_probs` by set_attn_mask_probs, train()/eval() and load_state_dict,
    # never inside forward.
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
    ours.set_attn_mask_probs([0.0] * TINY["num_blocks"])
    assert masking_blocks() == 0 and ours.masking_blocks == (False,) * TINY["num_blocks"]
    ours.attn_mask_probs[1] = 0.5  # written in place: read at the next train()/eval()
    assert masking_blocks() == 0
    ours.eval()
    assert masking_blocks() == 1
    ours.load_state_dict({**ours.state_dict(), "attn_mask_probs": torch.ones(TINY["num_blocks"])})
    assert masking_blocks() == TINY["num_blocks"]

    # An annealed model's forward does not touch the buffer, and nothing is read back to the host
    # (`_local_scalar_dense`, behind `bool(tensor)` and `.item()`): on an accelerator each would be a synchronisation.
    ours.set_attn_mask_probs([0.0] * TINY["num_blocks"])
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


def test_attention_implementation_switches_after_loading(tmp_path):
    # As with the built-in: `set_attn_implementation` after `from_pretrained` switches every layer, and the eager
    # path returns the attention probabilities (SDPA returns none).
    ours, builtin = make_pair("eager")
    ours.save_pretrained(tmp_path)
    loaded = EomtForUniversalSegmentation.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    builtin.eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(a is None for a in loaded(pixels, output_attentions=True).attentions or ())
        loaded.set_attn_implementation("eager")
        got, want = loaded(pixels, output_attentions=True), builtin(pixels, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == TINY["num_hidden_layers"]
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selection", [True, 1, [0, -1]])
def test_hidden_states_are_recorded_as_in_the_builtin(selection):
    ours, builtin = make_pair()
    ours.eval(), builtin.eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, want = ours(pixels, output_hidden_states=selection), builtin(pixels, output_hidden_states=selection)
    assert len(got.hidden_states) == len(want.hidden_states) > 0
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swiglu_checkpoints_we_save_load_in_stock_transformers(tmp_path):
    ours, _ = make_pair(use_swiglu_ffn=True)
    ours.set_attn_mask_probs([0.0] * TINY["num_blocks"])
    ours.eval().save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert any(".mlp.gate_proj." in name for name in names) and not any("weights_in" in name for name in names)
    stock = stock_logits(tmp_path, "eomt.EomtForUniversalSegmentation")  # a process that never imported us
    torch.manual_seed(0)
    with torch.no_grad():
        expected = ours(torch.randn(1, 3, 64, 64)).masks_queries_logits
    torch.testing.assert_close(stock, expected, atol=1e-5, rtol=0)


def test_importing_us_leaves_the_builtin_save_and_load_unchanged(tmp_path):
    # Our legacy-name mapping exists only while our from_pretrained runs; the built-in keeps today's names.
    ours, builtin = make_pair(use_swiglu_ffn=True)
    ours.save_pretrained(tmp_path / "ours")
    EomtForUniversalSegmentation.from_pretrained(tmp_path / "ours")
    builtin.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert names == set(builtin.state_dict()) and not any("weights_in" in name for name in names)
    _, info = BuiltinModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_flex_attention_for_annealed_models():
    ours, _ = make_pair()
    ours.eval().set_attn_mask_probs([0.0] * TINY["num_blocks"])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ours(pixels).masks_queries_logits
        ours.set_attn_implementation("flex_attention")
        torch.testing.assert_close(ours(pixels).masks_queries_logits, expected, atol=1e-5, rtol=1e-5)
        ours.set_attn_mask_probs([1.0] * TINY["num_blocks"])
        with pytest.raises(ValueError, match="eager or SDPA"):
            ours(pixels)
