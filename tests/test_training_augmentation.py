"""Training augmentation and collators, on examples whose colours tell which mask a pixel belongs to."""

import torch

from modeling_eomt.training.augmentation import TrainTransform, _shift_hue, photometric_jitter, resize_window
from modeling_eomt.training.collators import SegmentationCollator
from modeling_eomt.training.dataset import SegmentationDataset
from modeling_eomt.training.loading import load_segmentation_dataset
from modeling_eomt.training.shapes import SHAPES_ID2LABEL


def _colour_coded_example(height=40, width=56):
    """Blocks of flat colour; the colour of a pixel tells which mask it belongs to."""
    palette = torch.tensor(
        [[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250]], dtype=torch.uint8
    )
    segment = torch.zeros(height, width, dtype=torch.int64)
    segment[:, width // 3 :] = 1
    segment[height // 2 :, width // 3 :] = 2
    segment[5:15, 30:50] = 3
    segment[-8:, :10] = 4  # the crowd segment
    masks = torch.stack([segment == k for k in range(5)])
    return {
        "image": palette[segment].permute(2, 0, 1).contiguous(),
        "masks": masks,
        "class_labels": torch.arange(5),
        "is_crowd": torch.tensor([False, False, False, False, True]),
    }, palette


def _eroded(mask: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1))
    return (-torch.nn.functional.max_pool2d(-padded, 3, stride=1))[0, 0].bool()


def test_augmentation_keeps_masks_aligned_with_pixels():
    example, palette = _colour_coded_example()
    transform = TrainTransform(crop_size=(32, 48), scale_range=(0.3, 2.0))
    for seed in range(12):
        out = transform(example, generator=torch.Generator().manual_seed(seed))
        again = transform(example, generator=torch.Generator().manual_seed(seed))
        assert all(torch.equal(out[k], again[k]) for k in out)
        assert out["image"].shape == (3, 32, 48) and out["masks"].shape[1:] == (32, 48)
        assert 4 not in out["class_labels"].tolist() and not out["is_crowd"].any()  # crowd dropped
        assert out["masks"].flatten(1).any(1).all()  # empty masks dropped
        covered = out["masks"].any(0)
        for mask, label in zip(out["masks"], out["class_labels"]):
            inner = _eroded(mask)
            colours = out["image"][:, inner].T.int()
            assert (colours - palette[label].int()).abs().max() <= 2, (seed, int(label))
        # Pixels outside every mask are padding (black) or the dropped crowd segment's colour.
        uncovered = out["image"][:, _eroded(~covered)].T.int()
        black_or_crowd = (uncovered.abs().max(1).values <= 2) | (
            (uncovered - palette[4].int()).abs().max(1).values <= 2
        )
        assert black_or_crowd.all()


def test_augmentation_flip_and_scale_by_hand():
    example, _ = _colour_coded_example(height=32, width=48)
    # Scale fixed at 1 for a crop of the image's own size: only the flip can change the example.
    transform = TrainTransform(crop_size=(32, 48), scale_range=(1.0, 1.0), flip_probability=1.0)
    out = transform({k: v for k, v in example.items()}, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["image"], example["image"].flip(-1))
    assert torch.equal(out["masks"], example["masks"][:4].flip(-1))
    # Scale 0.5 of a crop twice the image's size keeps the image's size: it lands top-left, the rest is zero padding.
    half = TrainTransform(crop_size=(64, 96), scale_range=(0.5, 0.5), flip_probability=0.0)(example)
    assert half["image"].shape == (3, 64, 96) and half["masks"].shape == (4, 64, 96)
    assert torch.equal(half["image"][:, :32, :48], example["image"])
    assert torch.equal(half["masks"][:, :32, :48], example["masks"][:4])
    assert half["image"][:, 32:].eq(0).all() and half["image"][:, :, 48:].eq(0).all()
    assert not half["masks"][:, 32:].any() and not half["masks"][:, :, 48:].any()


def test_photometric_jitter():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    first = photometric_jitter(image, torch.Generator().manual_seed(1))
    assert torch.equal(first, photometric_jitter(image, torch.Generator().manual_seed(1)))
    assert first.dtype == torch.uint8 and first.shape == image.shape
    assert any(not torch.equal(photometric_jitter(image, torch.Generator().manual_seed(s)), image) for s in range(5))
    # Hue by hand: a 120° turn takes red to green, green to blue; 0° changes nothing.
    colours = torch.tensor([[255.0, 0, 0], [0, 255, 0], [40, 90, 200]]).T.reshape(3, 3, 1)
    turned = _shift_hue(colours, 1 / 3).reshape(3, 3).T
    assert torch.allclose(turned[0], torch.tensor([0.0, 255, 0]), atol=1e-3)
    assert torch.allclose(turned[1], torch.tensor([0.0, 0, 255]), atol=1e-3)
    assert torch.allclose(_shift_hue(colours, 0.0), colours, atol=1e-3)


def test_dataset_seeded_transforms_and_epochs():
    dataset = load_segmentation_dataset("shapes", "panoptic", num_examples=4, image_size=48)
    augmented = dataset.with_transform(TrainTransform(48, (0.5, 1.5)), seed=0)
    assert dataset.transform is None  # the view leaves the original alone
    a, b = augmented[2], augmented[2]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    augmented.set_epoch(1)
    assert any(not torch.equal(augmented[i]["image"], dataset.with_transform(augmented.transform, seed=0)[i]["image"])
               for i in range(4))  # fmt: skip
    assert isinstance(augmented, SegmentationDataset) and augmented.id2label == SHAPES_ID2LABEL


def test_collator_shapes_dtypes_and_normalisation():
    small = {"image": torch.full((3, 8, 10), 255, dtype=torch.uint8), "masks": torch.ones(2, 8, 10, dtype=torch.bool),
             "class_labels": torch.tensor([1, 4])}  # fmt: skip
    large = {
        "image": torch.zeros(3, 12, 16, dtype=torch.uint8),
        "masks": torch.zeros(0, 12, 16, dtype=torch.bool),
        "class_labels": torch.zeros(0, dtype=torch.int64),
        "is_crowd": torch.zeros(0, dtype=torch.bool),
    }
    batch = SegmentationCollator()([small, large])
    assert set(batch) == {"pixel_values", "mask_labels", "class_labels"}
    assert batch["pixel_values"].shape == (2, 3, 12, 16) and batch["pixel_values"].dtype == torch.float32
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(batch["pixel_values"][0, :, 0, 0], (1 - mean) / std)
    assert torch.allclose(batch["pixel_values"][0, :, 11, 15], -mean / std)  # zero padding, then normalised
    assert [m.shape for m in batch["mask_labels"]] == [(2, 12, 16), (0, 12, 16)]
    assert batch["mask_labels"][0].dtype == torch.float32
    assert batch["mask_labels"][0][:, :8, :10].eq(1).all() and batch["mask_labels"][0][:, 8:].eq(0).all()
    assert [c.dtype for c in batch["class_labels"]] == [torch.int64] * 2 and batch["class_labels"][0].tolist() == [
        1,
        4,
    ]


def test_resize_window_samples_masks_like_torch_nearest_exact():
    generator = torch.Generator().manual_seed(0)
    for height, width, size, top, left, window in (
        (37, 53, (80, 91), 10, 30, (64, 64)),  # upscale, window inside
        (100, 64, (33, 20), 0, 0, (40, 40)),  # downscale, window beyond the border
        (480, 640, (960, 1280), 500, 900, (640, 640)),
    ):
        masks = torch.rand(3, height, width, generator=generator) > 0.5
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        out = resize_window({"image": image, "masks": masks}, size, top, left, window)
        full_masks = torch.nn.functional.interpolate(masks[None].byte(), size=size, mode="nearest-exact")[0].bool()
        full_image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
        rows, cols = min(window[0], size[0] - top), min(window[1], size[1] - left)
        assert torch.equal(out["masks"][:, :rows, :cols], full_masks[:, top : top + rows, left : left + cols])
        assert torch.equal(out["image"][:, :rows, :cols], full_image[:, top : top + rows, left : left + cols])
        assert not out["masks"][:, rows:].any() and not out["masks"][:, :, cols:].any()
        assert out["image"][:, rows:].eq(0).all() and out["image"][:, :, cols:].eq(0).all()
