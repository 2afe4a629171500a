"""EomtImageProcessor.for_task: the processor settings each task uses, checked on real inputs."""

import pytest
import torch

from modeling_eomt import EomtImageProcessor


def test_panoptic_and_instance_pad_the_long_side_to_a_square():
    for task in ("panoptic", "instance"):
        processor = EomtImageProcessor.for_task(task, 64)
        pixels = processor(images=torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8))["pixel_values"]
        assert pixels.shape == (1, 3, 64, 64)
        assert torch.equal(pixels[0, :, 43:], pixels[0, :, 43:][:, :1].expand(-1, 21, -1))  # zero-padded rows


def test_semantic_slides_windows_over_the_long_side():
    processor = EomtImageProcessor.for_task("semantic", 32, do_reduce_labels=True)
    out = processor(images=torch.randint(0, 255, (3, 32, 80), dtype=torch.uint8))
    assert out["pixel_values"].shape == (3, 3, 32, 32)  # ceil(80 / 32) windows
    assert [offset.tolist() for offset in out["patch_offsets"]] == [[0, 0, 32], [0, 24, 56], [0, 48, 80]]
    assert processor.ignore_index == 255 and processor.do_reduce_labels


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="Unknown task 'depth'"):
        EomtImageProcessor.for_task("depth", 64)
