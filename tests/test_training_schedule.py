"""The recipe's schedules: masked-attention annealing, layer-wise lr decay groups, two-stage warmup + poly decay."""

import itertools

import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation
from modeling_eomt.training.annealing import AttnMaskAnnealingCallback, annealing_probs, default_annealing_steps
from modeling_eomt.training.optim import (
    EomtTrainer,
    EomtTrainingArguments,
    build_optimizer_and_scheduler,
    parameter_groups,
    two_stage_poly_factor,
)

NUM_LAYERS = 3


def tiny_model(num_blocks: int = 2) -> EomtForUniversalSegmentation:
    torch.manual_seed(0)
    config = EomtConfig(
        hidden_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        image_size=32,
        num_blocks=num_blocks,
        num_queries=4,
        num_labels=3,
        train_num_points=64,
    )
    return EomtForUniversalSegmentation(config)


# The original release's hard-coded windows: COCO L (12 epochs, 88692 steps), COCO S 2x (177384 steps, 3 blocks),
# ADE20K panoptic L (39120 steps).
@pytest.mark.parametrize(
    "total_steps, num_blocks, starts, ends",
    [
        (88692, 4, [14782, 29564, 44346, 59128], [29564, 44346, 59128, 73910]),
        (177384, 3, [29564, 73910, 118256], [59128, 103474, 147820]),
        (39120, 4, [6520, 13040, 19560, 26080], [13040, 19560, 26080, 32600]),
    ],
)
def test_default_annealing_steps_match_original_configs(total_steps, num_blocks, starts, ends):
    assert default_annealing_steps(total_steps, num_blocks) == (starts, ends)


def test_default_annealing_steps_scale_with_total():
    starts, ends = default_annealing_steps(600, 5)
    assert starts[0] == 100 and ends[-1] == 500
    assert all(end - start == 100 for start, end in zip(starts, ends))
    assert default_annealing_steps(600, 1) == ([100], [200])


def test_annealing_probs_piecewise():
    starts, ends = [10, 20], [20, 30]
    assert annealing_probs(0, starts, ends) == [1.0, 1.0]
    assert annealing_probs(10, starts, ends) == [1.0, 1.0]
    assert annealing_probs(15, starts, ends) == pytest.approx([0.5**0.9, 1.0])
    assert annealing_probs(20, starts, ends) == [0.0, 1.0]
    assert annealing_probs(28, starts, ends, power=2.0) == pytest.approx([0.0, 0.2**2])
    assert annealing_probs(30, starts, ends) == [0.0, 0.0]
    values = [annealing_probs(step, starts, ends)[0] for step in range(40)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_annealing_rejects_bad_windows():
    with pytest.raises(ValueError, match="ends"):
        annealing_probs(0, [1, 2], [3])
    with pytest.raises(ValueError, match="before it starts"):
        annealing_probs(0, [5], [3])
    with pytest.raises(ValueError, match="both"):
        AttnMaskAnnealingCallback(starts=[1])


class TinySegmentationSet(Dataset):
    """Random 32-px images, each with two rectangles of random classes."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        masks = torch.zeros(2, 32, 32)
        masks[0, :16] = 1
        masks[1, 16:, 8:] = 1
        return {
            "pixel_values": torch.randn(3, 32, 32, generator=generator),
            "mask_labels": masks,
            "class_labels": torch.randint(0, 3, (2,), generator=generator),
        }


def collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "mask_labels": [e["mask_labels"] for e in examples],
        "class_labels": [e["class_labels"] for e in examples],
    }


def assert_rows_close(actual, expected):
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


def run_training(output_dir, max_steps, resume_from_checkpoint=None, **kwargs):
    """Train a tiny EoMT; return the attention-mask probabilities and lrs seen by each optimizer step."""
    model = tiny_model()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.attn_mask_probs.tolist()))
    args = EomtTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=4,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        remove_unused_columns=False,
        **kwargs,
    )
    lrs = []

    class RecordLr(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **_):
            lrs.append([group["lr"] for group in optimizer.param_groups])

    trainer = EomtTrainer(
        model=model, args=args, train_dataset=TinySegmentationSet(), data_collator=collate, callbacks=[RecordLr()]
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return seen, lrs, model


def test_trainer_sets_probs_every_step_and_survives_resume(tmp_path):
    windows = {"attn_mask_annealing_starts": [2, 5], "attn_mask_annealing_ends": [6, 9]}
    schedule = {"head_warmup_steps": 2, "backbone_warmup_steps": 3}
    seen, lrs, model = run_training(tmp_path / "full", 10, **windows, **schedule)
    expected = [annealing_probs(step, [2, 5], [6, 9]) for step in range(10)]
    assert_rows_close(seen, expected)
    assert model.attn_mask_probs.tolist() == [0.0, 0.0]

    # Resume from the checkpoint at step 4: the remaining steps see the same probabilities and lrs.
    resumed_seen, resumed_lrs, _ = run_training(
        tmp_path / "full", 10, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"), **windows, **schedule
    )
    assert_rows_close(resumed_seen, expected[4:])
    assert_rows_close(resumed_lrs, lrs[4:])


def test_callback_default_windows_scale_with_max_steps():
    model = tiny_model(num_blocks=2)
    callback = AttnMaskAnnealingCallback()
    starts, ends = default_annealing_steps(12, 2)
    assert (starts, ends) == ([2, 8], [4, 10])
    seen = []
    for step in range(13):
        callback.on_step_begin(None, TrainerState(global_step=step, max_steps=12), TrainerControl(), model=model)
        seen.append(model.attn_mask_probs.tolist())
    assert_rows_close(seen, [annealing_probs(step, starts, ends) for step in range(13)])


def test_trainer_rejects_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="EomtTrainingArguments"):
        EomtTrainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_callback_unwraps_and_checks_block_count():
    model = tiny_model(num_blocks=2)
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP looks like from outside
    state = TrainerState(global_step=7, max_steps=12)
    callback = AttnMaskAnnealingCallback(starts=[0, 6], ends=[10, 8], power=1.0)
    callback.on_step_begin(None, state, TrainerControl(), model=wrapper)
    assert model.attn_mask_probs.tolist() == pytest.approx([0.3, 0.5])
    with pytest.raises(ValueError, match="2 masked blocks but 3"):
        AttnMaskAnnealingCallback(starts=[1, 2, 3], ends=[2, 3, 4]).on_step_begin(
            None, state, TrainerControl(), model=model
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


def test_training_arguments_recipe_defaults_and_flags(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EomtTrainingArguments)
    (defaults,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert (defaults.learning_rate, defaults.weight_decay, defaults.max_grad_norm) == (1e-4, 0.05, 0.01)
    assert (defaults.layer_decay, defaults.head_warmup_steps, defaults.backbone_warmup_steps) == (0.8, 500, 1000)
    assert defaults.attn_mask_annealing and defaults.attn_mask_annealing_starts is None
    flags = ["--attn_mask_annealing_starts", "1", "2", "--attn_mask_annealing_ends", "3", "4", "--layer_decay", "0.9"]
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none", *flags])
    assert (args.attn_mask_annealing_starts, args.attn_mask_annealing_ends, args.layer_decay) == ([1, 2], [3, 4], 0.9)


def test_memory_is_pinned_only_for_an_accelerator(tmp_path):
    args = EomtTrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert args.dataloader_pin_memory == torch.accelerator.is_available()
