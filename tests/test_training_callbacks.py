"""Trainer callbacks: the masked-attention annealing schedule and its callback, epoch seeding of the augmentation."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from tiny_eomt import tiny_model
from transformers import TrainerControl, TrainerState

from modeling_eomt.training.augmentation import TrainTransform
from modeling_eomt.training.callbacks import (
    AttnMaskAnnealingCallback,
    EpochSeedCallback,
    annealing_probs,
    default_annealing_steps,
)
from modeling_eomt.training.loading import load_segmentation_dataset


def assert_rows_close(actual, expected):
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


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


def test_dinov3_first_block_anneals_from_step_zero():
    """The DINOv3 release's COCO L windows: starts 0, 29564, 44346, 59128; ends 3000, 44346, 59128, 73910."""
    assert default_annealing_steps(88692, 4, first_block_end=3000) == (
        [0, 29564, 44346, 59128],
        [3000, 44346, 59128, 73910],
    )
    # A run shorter than the window still ends the first block's annealing within its scaled window.
    assert default_annealing_steps(600, 2, first_block_end=3000) == ([0, 400], [200, 500])


def test_callback_writes_through_set_attn_mask_probs(monkeypatch):
    model = tiny_model(num_blocks=2)
    written = []
    monkeypatch.setattr(model, "set_attn_mask_probs", written.append)
    callback = AttnMaskAnnealingCallback(starts=[0, 6], ends=[10, 8], power=1.0)
    callback.on_step_begin(None, TrainerState(global_step=7, max_steps=12), TrainerControl(), model=model)
    assert written == [pytest.approx([0.3, 0.5])]
    assert model.attn_mask_probs.tolist() == [1.0, 1.0]  # nothing but the model's setter touched the buffer


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


def test_epoch_callback_reseeds_augmentation_per_epoch():
    dataset = load_segmentation_dataset("shapes", num_examples=2, image_size=64).with_transform(
        TrainTransform(64, (0.5, 1.5)), seed=0
    )
    callback = EpochSeedCallback(dataset)
    callback.on_epoch_begin(None, SimpleNamespace(epoch=0.0), None)
    first = dataset[0]["image"]
    assert torch.equal(first, dataset[0]["image"])  # same epoch, same augmentation
    callback.on_epoch_begin(None, SimpleNamespace(epoch=1.0), None)
    assert dataset.epoch == 1 and not torch.equal(first, dataset[0]["image"])

    # persistent workers keep their copy of the dataset across epochs, and still follow the epoch
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1, persistent_workers=True)
    images = []
    for epoch in (0, 1):
        callback.on_epoch_begin(None, SimpleNamespace(epoch=float(epoch)), None)
        images.append(next(iter(loader))["image"])
    assert torch.equal(images[0], first) and not torch.equal(images[1], first)
