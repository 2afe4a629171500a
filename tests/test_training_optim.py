"""The recipe's optimizer and schedule: layer-wise lr decay groups, two-stage warmup + poly decay."""

import pytest
from tiny_eomt import NUM_LAYERS, tiny_model

from modeling_eomt.training.optim import (
    build_optimizer_and_scheduler,
    parameter_groups,
    two_stage_poly_factor,
)


def test_layer_wise_lr_decay_groups():
    model = tiny_model()
    groups = parameter_groups(model, learning_rate=1e-4, weight_decay=0.05, layer_decay=0.8)
    names = {id(param): name for name, param in model.named_parameters()}
    lr_of = {
        names[id(p)]: (group["lr"], group["stage"], group["weight_decay"]) for group in groups for p in group["params"]
    }
    assert set(lr_of) == set(names.values())
    assert all(wd == 0.05 for _, _, wd in lr_of.values())
    for name, (lr, stage, _) in lr_of.items():
        if name.startswith("layers."):
            block = int(name.split(".")[1])
            expected = (1e-4 * 0.8 ** (NUM_LAYERS - 1 - block), "backbone")
        elif name.startswith("embeddings."):  # patch/pos embeddings, CLS, registers: block 0's rate
            expected = (1e-4 * 0.8 ** (NUM_LAYERS - 1), "backbone")
        elif name.startswith("layernorm."):
            expected = (1e-4, "backbone")
        else:
            assert name.split(".")[0] in {"query", "class_predictor", "mask_head", "upscale_block"}
            expected = (1e-4, "head")
        assert (lr, stage) == pytest.approx(expected), name
    assert "embeddings.position_embeddings.weight" in lr_of and "embeddings.cls_token" in lr_of


def test_full_lr_blocks_leave_the_last_blocks_out_of_the_decay():
    model = tiny_model()
    decayed = parameter_groups(model, learning_rate=1e-4, layer_decay=0.5)
    full = parameter_groups(model, learning_rate=1e-4, layer_decay=0.5, full_lr_blocks=2)
    names = {id(param): name for name, param in model.named_parameters()}

    def lr_by_name(groups):
        return {names[id(p)]: group["lr"] for group in groups for p in group["params"]}

    before, after = lr_by_name(decayed), lr_by_name(full)
    for name, lr in after.items():
        if name.startswith(("layers.1.", "layers.2.")):
            assert lr == 1e-4, name
        else:  # embeddings, block 0, final norm and head as without the option
            assert lr == before[name], name
    assert before["layers.1.norm1.weight"] == 1e-4 * 0.5


def test_frozen_parameters_are_left_out():
    model = tiny_model()
    model.embeddings.requires_grad_(False)
    grouped = {id(p) for group in parameter_groups(model) for p in group["params"]}
    assert all(id(p) not in grouped for p in model.embeddings.parameters())
    assert all(id(p) in grouped for p in model.layers.parameters())


def test_two_stage_factor():
    # Head: linear warmup from step 0, then poly decay to 0 at the end.
    assert two_stage_poly_factor(0, 2000, 0, 500, 0.9) == 0.0
    assert two_stage_poly_factor(250, 2000, 0, 500, 0.9) == 0.5
    assert two_stage_poly_factor(500, 2000, 0, 500, 0.9) == 1.0
    assert two_stage_poly_factor(1250, 2000, 0, 500, 0.9) == pytest.approx(0.5**0.9)
    assert two_stage_poly_factor(2000, 2000, 0, 500, 0.9) == 0.0
    # Backbone: frozen for 500 steps, warmup over 1000, then poly decay.
    assert two_stage_poly_factor(499, 2000, 500, 1000, 0.9) == 0.0
    assert two_stage_poly_factor(1000, 2000, 500, 1000, 0.9) == 0.5
    assert two_stage_poly_factor(1500, 2000, 500, 1000, 0.9) == 1.0
    assert two_stage_poly_factor(1750, 2000, 500, 1000, 0.9) == pytest.approx(0.5**0.9)
    assert two_stage_poly_factor(2500, 2000, 500, 1000, 0.9) == 0.0


def test_scheduler_lrs_at_given_steps():
    model = tiny_model()
    optimizer, scheduler = build_optimizer_and_scheduler(model, total_steps=3000)
    head = next(g for g in optimizer.param_groups if g["stage"] == "head")
    last_block = next(g for g in optimizer.param_groups if g["stage"] == "backbone" and g["initial_lr"] == 1e-4)
    first_block = min(optimizer.param_groups, key=lambda g: g["initial_lr"])
    assert first_block["initial_lr"] == pytest.approx(1e-4 * 0.8 ** (NUM_LAYERS - 1))
    observed = {}
    for step in range(3000):
        if step in (0, 250, 500, 1000, 1500, 2250, 2999):
            observed[step] = (head["lr"], last_block["lr"], first_block["lr"])
        optimizer.step()
        scheduler.step()
    base_first = 1e-4 * 0.8 ** (NUM_LAYERS - 1)
    expected = {
        0: (0.0, 0.0, 0.0),
        250: (0.5e-4, 0.0, 0.0),
        500: (1e-4, 0.0, 0.0),
        1000: (1e-4 * (1 - 500 / 2500) ** 0.9, 0.5e-4, 0.5 * base_first),
        1500: (1e-4 * (1 - 1000 / 2500) ** 0.9, 1e-4, base_first),
        2250: (1e-4 * (1 - 1750 / 2500) ** 0.9, 1e-4 * 0.5**0.9, base_first * 0.5**0.9),
    }
    for step, values in expected.items():
        assert observed[step] == pytest.approx(values, abs=1e-12), step
    assert head["lr"] == last_block["lr"] == 0.0


def test_scheduler_state_roundtrip():
    """A scheduler restored from its state dict continues with the same lrs (what resuming relies on)."""
    model = tiny_model()
    optimizer, scheduler = build_optimizer_and_scheduler(model, total_steps=100, head_warmup_steps=5)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer2, scheduler2 = build_optimizer_and_scheduler(model, total_steps=100, head_warmup_steps=5)
    scheduler2.load_state_dict(state)
    optimizer.step(), scheduler.step(), optimizer2.step(), scheduler2.step()
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
