"""Bad or damaged inputs to the model and its loading: each gives a clear error naming the problem and the fix."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_eomt import TINY

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    EomtForUniversalSegmentation(EomtConfig(**TINY)).save_pretrained(tmp_path)
    return tmp_path


def test_truncated_weights_name_the_file(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="truncated or corrupt"):
        EomtForUniversalSegmentation.from_pretrained(saved)


def test_weights_missing_a_head_are_refused_unless_asked_for(saved):
    weights = load_file(saved / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("class_predictor")}, saved / "model.safetensors")
    with pytest.raises(ValueError, match=r"no weights for class_predictor\.bias, class_predictor\.weight"):
        EomtForUniversalSegmentation.from_pretrained(saved)
    _, info = EomtForUniversalSegmentation.from_pretrained(saved, allow_missing_weights=True, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["class_predictor.bias", "class_predictor.weight"]


def test_non_finite_weights_are_refused(saved):
    weights = load_file(saved / "model.safetensors")
    weights["mask_head.fc3.weight"][0, 0] = float("nan")
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"NaN or infinite values in mask_head\.fc3\.weight"):
        EomtForUniversalSegmentation.from_pretrained(saved)


TARGET_CASES = [
    ({"mask_labels": [torch.ones(1, 32, 32)], "class_labels": [torch.tensor([1])]}, ValueError, "input size"),
    ({"mask_labels": [torch.full((1, 64, 64), 255.0)], "class_labels": [torch.tensor([1])]}, ValueError, "binary"),
    ({"mask_labels": [torch.full((1, 64, 64), float("nan"))], "class_labels": [torch.tensor([1])]}, ValueError,
     "binary"),
    ({"mask_labels": [torch.ones(1, 64, 64)], "class_labels": [torch.tensor([1.0])]}, ValueError, "integer"),
    ({"mask_labels": [torch.ones(1, 64, 64)], "class_labels": [[1]]}, TypeError, "must be tensors"),
    ({"mask_labels": [torch.ones(1, 64, 64)], "class_labels": [torch.tensor([7])]}, ValueError, "num_labels"),
    ({"mask_labels": [torch.ones(64, 64)], "class_labels": [torch.tensor([1])]}, ValueError, "num_targets"),
]  # fmt: skip


@pytest.mark.parametrize("labels, error, message", TARGET_CASES)
def test_bad_training_targets_name_the_image(labels, error, message):
    model = EomtForUniversalSegmentation(EomtConfig(**TINY)).train()
    with pytest.raises(error, match=message) as raised:
        model(torch.randn(1, 3, 64, 64), **labels)
    assert "Image 0" in str(raised.value)
