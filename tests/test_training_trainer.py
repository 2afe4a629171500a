"""EomtTrainer and EomtTrainingArguments: the recipe's schedule and annealing inside a real Trainer run, resume."""

import pytest
import torch
from tiny_eomt import tiny_model
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments

from modeling_eomt.training.callbacks import annealing_probs
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
    assert (defaults.learning_rate, defaults.weight_decay, defaults.max_grad_norm) == (1e-4, 0.05, 0.01)
    assert (defaults.layer_decay, defaults.head_warmup_steps, defaults.backbone_warmup_steps) == (0.8, 500, 1000)
    assert defaults.attn_mask_annealing and defaults.attn_mask_annealing_starts is None
    flags = ["--attn_mask_annealing_starts", "1", "2", "--attn_mask_annealing_ends", "3", "4", "--layer_decay", "0.9"]
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none", *flags])
    assert (args.attn_mask_annealing_starts, args.attn_mask_annealing_ends, args.layer_decay) == ([1, 2], [3, 4], 0.9)


def test_memory_is_pinned_only_for_an_accelerator(tmp_path):
    args = EomtTrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert args.dataloader_pin_memory == torch.accelerator.is_available()
