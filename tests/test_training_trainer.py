"""EomtTrainer and EomtTrainingArguments: the recipe's schedule and annealing inside a real Trainer run, resume."""

import pytest
import torch
from tiny_eomt import tiny_model
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments

from modeling_eomt.training.callbacks import AttnMaskAnnealingCallback, annealing_probs
from modeling_eomt.training.trainer import EomtTrainer, EomtTrainingArguments


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


def test_trainer_rejects_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="EomtTrainingArguments"):
        EomtTrainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_training_arguments_recipe_defaults_and_flags(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EomtTrainingArguments)
    (defaults,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert (defaults.weight_decay, defaults.max_grad_norm) == (0.05, 0.01)
    assert defaults.attn_mask_annealing and defaults.attn_mask_annealing_starts is None
    # The recipe's values stay unset until the model's backbone family is known.
    assert (defaults.recipe, defaults.learning_rate, defaults.layer_decay) == (None, None, None)
    defaults.apply_recipe("eomt")
    assert (defaults.recipe, defaults.learning_rate, defaults.layer_decay) == ("dinov2", 1e-4, 0.8)
    assert (defaults.head_warmup_steps, defaults.backbone_warmup_steps) == (500, 1000)
    assert not defaults.full_lr_last_blocks and defaults.attn_mask_annealing_first_block_end is None
    flags = ["--attn_mask_annealing_starts", "1", "2", "--attn_mask_annealing_ends", "3", "4", "--layer_decay", "0.9"]
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none", *flags])
    assert (args.attn_mask_annealing_starts, args.attn_mask_annealing_ends, args.layer_decay) == ([1, 2], [3, 4], 0.9)


def parsed(tmp_path, *flags):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EomtTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", *flags]
    )
    return args


def test_dinov3_recipe_from_model_type_flag_and_benchmark(tmp_path):
    """The release's DINOv3 configs: lr 2e-4, warmups 2000/3000, masked blocks at full lr, first block annealed over
    steps 0-3000; on ADE20K semantic no layer decay. Flags given by the user win over the recipe."""
    args = parsed(tmp_path)
    args.apply_recipe("eomt_dinov3")
    assert (args.recipe, args.learning_rate, args.head_warmup_steps, args.backbone_warmup_steps) == (
        "dinov3",
        2e-4,
        2000,
        3000,
    )
    assert args.full_lr_last_blocks and args.attn_mask_annealing_first_block_end == 3000 and args.layer_decay == 0.8
    ade = parsed(tmp_path, "--recipe", "dinov3", "--learning_rate", "5e-5")
    ade.apply_recipe("eomt", "ade20k_semantic")  # the flag beats the model type
    assert (ade.recipe, ade.learning_rate, ade.layer_decay) == ("dinov3", 5e-5, 1.0)
    with pytest.raises(ValueError, match="--recipe"):
        parsed(tmp_path).apply_recipe("vit")
    with pytest.raises(SystemExit):  # argparse rejects other recipe names
        parsed(tmp_path, "--recipe", "dinov4")


def test_trainer_builds_the_dinov3_optimizer_and_annealing(tmp_path):
    model = tiny_model(num_blocks=2)
    args = EomtTrainingArguments(output_dir=str(tmp_path), report_to=[], recipe="dinov3", max_steps=30000)
    trainer = EomtTrainer(model=model, args=args, train_dataset=TinySegmentationSet(), data_collator=collate)
    lrs = {
        name: group["lr"] for group in trainer.create_optimizer().param_groups for name in group_names(model, group)
    }
    # 3 blocks, the last 2 masked: block 0 keeps its decay (0.8 ** 2), the masked ones train at the full 2e-4.
    assert lrs["layers.0.norm1.weight"] == pytest.approx(2e-4 * 0.8**2)
    assert lrs["layers.1.norm1.weight"] == lrs["layers.2.norm1.weight"] == lrs["class_predictor.weight"] == 2e-4
    (annealing,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AttnMaskAnnealingCallback)]
    assert annealing.windows(30000, 2) == ([0, 20000], [3000, 25000])


def group_names(model, group):
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for param in group["params"]]


def test_memory_is_pinned_only_for_an_accelerator(tmp_path):
    args = EomtTrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert args.dataloader_pin_memory == torch.accelerator.is_available()
