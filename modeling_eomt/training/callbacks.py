"""The recipe's Trainer callbacks: annealing of the masked attention, and epoch seeding of the augmentation.

Each of the last `num_blocks` ViT blocks applies masked attention with a probability `p_i` (the model's
`attn_mask_probs`, set through `set_attn_mask_probs`). `p_i` is 1 before `start_i`, `(1 - progress) ** power` between `start_i` and `end_i`, and 0
after, so that the model ends training without masks, as it runs at inference. The blocks anneal one after another.

The probabilities are a pure function of the optimizer step, so a resumed run sees exactly the values of an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .dataset import SegmentationDataset
from .optim import unwrap_model

logger = logging.get_logger(__name__)


def default_annealing_steps(
    total_steps: int, num_blocks: int, first_block_end: int | None = None
) -> tuple[list[int], list[int]]:
    """
    The original release's annealing windows, scaled to `total_steps` (T): every block anneals over T/6, the first
    starts at T/6, the last ends at 5T/6, the starts are evenly spaced in between. For EoMT-L on COCO (T = 88692,
    4 blocks) this gives starts 14782, 29564, 44346, 59128 and ends 29564, 44346, 59128, 73910.

    With `first_block_end` (the DINOv3 recipe: 3000), the first block anneals from step 0 instead, until
    `first_block_end` or its scaled end, whichever comes first (so that short runs still end without masks).
    """
    if total_steps <= 0 or num_blocks <= 0:
        raise ValueError(f"total_steps and num_blocks must be positive, got {total_steps} and {num_blocks}.")
    # In sixths of T, start_i = 1 + 3 i / (num_blocks - 1) runs from 1 to 4.
    offsets = [Fraction(3 * i, num_blocks - 1) if num_blocks > 1 else Fraction(0) for i in range(num_blocks)]
    starts = [round(total_steps * (1 + offset) / 6) for offset in offsets]
    ends = [round(total_steps * (2 + offset) / 6) for offset in offsets]
    if first_block_end is not None:
        starts[0], ends[0] = 0, min(first_block_end, ends[0])
    return starts, ends


def annealing_probs(step: int, starts: Sequence[int], ends: Sequence[int], power: float = 0.9) -> list[float]:
    """Masked-attention probability of each block at optimizer step `step`."""
    if len(starts) != len(ends):
        raise ValueError(f"Got {len(starts)} annealing starts but {len(ends)} ends; give one of each per block.")
    probs = []
    for start, end in zip(starts, ends):
        if end < start:
            raise ValueError(f"Annealing window ends ({end}) before it starts ({start}).")
        if step < start:
            probs.append(1.0)
        elif step >= end:
            probs.append(0.0)
        else:
            probs.append((1.0 - (step - start) / (end - start)) ** power)
    return probs


class AttnMaskAnnealingCallback(TrainerCallback):
    """
    Sets the model's masked-attention probabilities (`set_attn_mask_probs`) before every optimizer step from [`annealing_probs`] at `state.global_step`.

    Args:
        starts (`list[int]`, *optional*):
            Step at which each masked block starts annealing. Defaults to [`default_annealing_steps`] of
            `state.max_steps`.
        ends (`list[int]`, *optional*):
            Step at which each masked block reaches probability 0. Given together with `starts`.
        power (`float`, defaults to 0.9):
            Power of the polynomial decay.
        first_block_end (`int`, *optional*):
            With the default windows: the first masked block anneals over steps 0 to this (see
            [`default_annealing_steps`]; the DINOv3 recipe uses 3000).
    """

    def __init__(
        self,
        starts: Sequence[int] | None = None,
        ends: Sequence[int] | None = None,
        power: float = 0.9,
        first_block_end: int | None = None,
    ):
        if (starts is None) != (ends is None):
            raise ValueError("Give both `starts` and `ends` of the annealing windows, or neither for the defaults.")
        self.starts = None if starts is None else list(starts)
        self.ends = None if ends is None else list(ends)
        self.power = power
        self.first_block_end = first_block_end

    def windows(self, max_steps: int, num_blocks: int) -> tuple[list[int], list[int]]:
        """The annealing windows used for a run of `max_steps` optimizer steps."""
        if self.starts is None:
            return default_annealing_steps(max_steps, num_blocks, self.first_block_end)
        if len(self.starts) != num_blocks:
            raise ValueError(
                f"The model has {num_blocks} masked blocks but {len(self.starts)} annealing windows were given; "
                f"pass {num_blocks} starts and ends."
            )
        return self.starts, self.ends

    def _update(self, state: TrainerState, model: nn.Module | None) -> tuple[list[int], list[int]]:
        if model is None:
            raise ValueError("AttnMaskAnnealingCallback needs the model; use it inside a `Trainer`.")
        model = unwrap_model(model)
        if not hasattr(model, "set_attn_mask_probs"):
            raise TypeError(
                f"{type(model).__name__} has no `set_attn_mask_probs`; the annealing callback only applies to EoMT "
                "models (EomtForUniversalSegmentation)."
            )
        starts, ends = self.windows(state.max_steps, model.config.num_blocks)
        model.set_attn_mask_probs(annealing_probs(state.global_step, starts, ends, self.power))
        return starts, ends

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        starts, ends = self._update(state, model)
        logger.info(f"Masked-attention annealing over {state.max_steps} steps: starts {starts}, ends {ends}.")

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self._update(state, model)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        # Leave the model with the probabilities of the step it ended on (0 after a full run).
        self._update(state, model)


class EpochSeedCallback(TrainerCallback):
    """Tell the training set which epoch starts, so seeded augmentations differ per epoch in every process
    (accelerate forwards `set_epoch` to the dataset only in single-process runs)."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))
