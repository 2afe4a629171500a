"""EoMT with a DINOv3 backbone: parity with transformers' built-in `eomt_dinov3` (the oracle), interop both ways,
any input size, RoPE augmentations, Auto classes and the pipeline."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny_eomt import stock_logits
from transformers import AutoConfig, AutoModelForUniversalSegmentation, pipeline

from modeling_eomt import EomtDinov3Config, EomtDinov3ForUniversalSegmentation, EomtImageProcessor

BuiltinConfig = transformers.models.eomt_dinov3.EomtDinov3Config
BuiltinModel = transformers.models.eomt_dinov3.EomtDinov3ForUniversalSegmentation

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_blocks": 2,
    "image_size": 64,
    "num_queries": 6,
    "num_labels": 5,
    "num_register_tokens": 2,
    "layer_norm_eps": 1e-5,
}


def make_pair(attn: str = "sdpa", **overrides):
    kwargs = {**TINY, **overrides}
    ours = EomtDinov3ForUniversalSegmentation(EomtDinov3Config(**kwargs, attn_implementation=attn))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ours.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        # Without these biases the random masks take both signs, so masked attention restricts something.
        for layer in ours.upscale_block.block:
            layer.conv1.bias.zero_(), layer.layernorm2d.bias.zero_()
        ours.mask_head.fc3.bias.zero_()
    builtin = BuiltinModel(BuiltinConfig(**kwargs, attn_implementation=attn))
    missing, unexpected = builtin.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, builtin


def assert_relative(got: torch.Tensor, want: torch.Tensor, tolerance: float = 1e-5) -> None:
    assert ((got - want).abs().max() / want.abs().max()).item() <= tolerance


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("gated", [False, True])
def test_eval_and_masked_logits_match_builtin(attn, gated):
    ours, builtin = make_pair(attn, use_gated_mlp=gated)
    pixels = torch.randn(2, 3, 64, 64)
    ours.eval(), builtin.eval()
    ours.set_attn_mask_probs([0.0, 0.0])
    builtin.attn_mask_probs.zero_()
    with torch.no_grad():
        a, b = ours(pixels), builtin(pixels)
    assert_relative(a.masks_queries_logits, b.masks_queries_logits)
    assert_relative(a.class_queries_logits, b.class_queries_logits)
    # Masked attention (probabilities 1, so no random release), in training mode with the RoPE augmentation off.
    for model in (ours, builtin):
        model.config.pos_embed_rescale = None
        model.train()
    ours.set_attn_mask_probs([1.0, 1.0])
    builtin.attn_mask_probs.fill_(1.0)
    with torch.no_grad():
        a, b = ours(pixels), builtin(pixels)
    assert_relative(a.masks_queries_logits, b.masks_queries_logits)
    ours.set_attn_mask_probs([0.0, 0.0])
    with torch.no_grad():
        unmasked = ours(pixels)
    assert not torch.allclose(unmasked.masks_queries_logits, a.masks_queries_logits, atol=1e-3)


def test_folders_load_both_ways(tmp_path):
    ours, builtin = make_pair()
    builtin.save_pretrained(tmp_path / "builtin")
    loaded, info = EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path / "builtin", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(AutoConfig.from_pretrained(tmp_path / "builtin")) is EomtDinov3Config
    for name, tensor in builtin.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    ours.set_attn_mask_probs([0.0, 0.0])
    ours.eval().save_pretrained(tmp_path / "ours")
    # A process that never imported us reads the folder with the built-in classes.
    stock = stock_logits(tmp_path / "ours", "eomt_dinov3.EomtDinov3ForUniversalSegmentation")
    torch.manual_seed(0)
    with torch.no_grad():
        expected = ours(torch.randn(1, 3, 64, 64)).masks_queries_logits
    assert_relative(stock, expected)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "eomt_dinov3" and saved["architectures"] == ["EomtDinov3ForUniversalSegmentation"]


def test_rope_follows_the_input_grid():
    # The built-in only takes `image_size` inputs; configured for 48, it is the oracle for our model (native 64)
    # run on 48×48: the rotary coordinates depend only on the input's patch grid.
    ours, _ = make_pair()
    builtin = BuiltinModel(BuiltinConfig(**{**TINY, "image_size": 48}))
    builtin.load_state_dict(ours.state_dict())
    ours.eval(), builtin.eval()
    ours.set_attn_mask_probs([0.0, 0.0])
    builtin.attn_mask_probs.zero_()
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert_relative(ours(pixels).masks_queries_logits, builtin(pixels).masks_queries_logits)
        wide = ours(torch.randn(2, 3, 32, 80))
    assert wide.masks_queries_logits.shape == (2, 6, 8, 20)  # 4× the 2×5 grid


def test_rope_augmentations_only_in_training():
    ours, _ = make_pair(pos_embed_shift=0.1, pos_embed_jitter=1.2, pos_embed_rescale=2.0)
    ours.set_attn_mask_probs([0.0, 0.0])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours.eval()
        first, second = ours(pixels), ours(pixels)
        torch.testing.assert_close(first.masks_queries_logits, second.masks_queries_logits)
        ours.train()
        third, fourth = ours(pixels), ours(pixels)
    assert not torch.allclose(third.masks_queries_logits, fourth.masks_queries_logits)


def test_config_refuses_unknown_rope_type_and_reads_builtin_defaults():
    with pytest.raises(ValueError, match="only uses the 'default' RoPE"):
        EomtDinov3Config(rope_parameters={"rope_type": "yarn", "rope_theta": 100.0})
    ours, builtin = EomtDinov3Config(), BuiltinConfig()
    for name, value in builtin.to_dict().items():
        if name not in ("transformers_version", "architectures"):
            assert getattr(ours, name) == value, name


def test_auto_classes_and_pipeline_use_ours(tmp_path):
    ours, _ = make_pair(id2label={i: f"class {i}" for i in range(5)})
    ours.set_attn_mask_probs([0.0, 0.0])
    ours.save_pretrained(tmp_path)
    EomtImageProcessor.for_task("panoptic", 64).save_pretrained(tmp_path)
    assert type(AutoModelForUniversalSegmentation.from_pretrained(tmp_path)) is EomtDinov3ForUniversalSegmentation
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    assert type(segmenter.model) is EomtDinov3ForUniversalSegmentation
    assert isinstance(segmenter.image_processor, EomtImageProcessor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    results = segmenter(image, subtask="panoptic", threshold=0.0)
    assert all(result["mask"].size == (60, 40) for result in results)


def test_sliding_window_semantic_inference():
    # Windows of the processor's size, the model at that size (not its native 64), stitched back to the image.
    ours, _ = make_pair()
    ours.eval().set_attn_mask_probs([0.0, 0.0])
    processor = EomtImageProcessor.for_task("semantic", 32)
    image = np.random.default_rng(0).integers(0, 256, (32, 80, 3), dtype=np.uint8)
    inputs = processor(images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 32, 32) and len(inputs["patch_offsets"]) == 3
    with torch.no_grad():
        outputs = ours(**inputs)
    (labels,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(32, 80)])
    assert labels.shape == (32, 80) and 0 <= labels.min() and labels.max() < TINY["num_labels"]
    # The windows' logits are the model's on each window alone: RoPE follows each input, nothing leaks between them.
    with torch.no_grad():
        first = ours(inputs["pixel_values"][:1]).masks_queries_logits
    torch.testing.assert_close(outputs.masks_queries_logits[:1], first, atol=1e-5, rtol=1e-5)
