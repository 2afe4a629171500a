"""`EomtForUniversalSegmentation.from_backbone`: a pretrained DINOv2/DINOv3 trunk, checked against the backbone models
themselves (transformers' DINOv2 and DINOv3 at their own patch size) and against timm's loader after resampling."""

import pytest
import torch
import transformers
from oracles import import_timm
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
)

from modeling_eomt import EomtDinov3ForUniversalSegmentation, EomtForUniversalSegmentation, backbones
from modeling_eomt.backbones import BackboneError, resample_patch_kernel
from modeling_eomt.positions import resize_position_grid

# Oracle target for DINOv3 until the package has its own DINOv3 EoMT (test-only).
timm = import_timm()
resample_abs_pos_embed, resample_patch_embed = timm.layers.resample_abs_pos_embed, timm.layers.resample_patch_embed
checkpoint_filter_fn = timm.models.vision_transformer.checkpoint_filter_fn
BuiltinDinov3Config = transformers.models.eomt_dinov3.EomtDinov3Config
BuiltinDinov3Model = transformers.models.eomt_dinov3.EomtDinov3ForUniversalSegmentation

TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2}
HEADS = {"num_blocks": 1, "num_queries": 3, "num_labels": 2}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter (layer scales, registers, position tables included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def trunk_states(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Hidden states of an EoMT before the queries join: the embeddings and the outputs of the first L - num_blocks
    blocks (the one place that knows how an EoMT exposes them)."""
    with torch.no_grad():
        states = model(pixels, output_hidden_states=True).hidden_states
    return tuple(states[: model.config.num_hidden_layers - model.config.num_blocks + 1])


def assert_states_equal(
    ours: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], tolerance: float = 1e-5
) -> None:
    assert len(ours) == len(reference) >= 2
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)


def eomt_trunk_keys(model: torch.nn.Module) -> set[str]:
    return {key for key in model.state_dict() if not key.startswith(backbones.HEAD_PREFIXES)}


# ---------------------------------------------------------------------------------------------- resampling vs timm
@pytest.mark.parametrize(("old", "new"), [(14, 16), (16, 14), (14, 8)])
def test_patch_kernel_resampling_matches_timm(old, new):
    kernel = torch.randn(8, 3, old, old)
    ours = resample_patch_kernel(kernel, new)
    assert ours.shape == (8, 3, new, new)
    torch.testing.assert_close(ours, resample_patch_embed(kernel, [new, new]), atol=1e-5, rtol=1e-4)


def test_resampled_kernel_responds_to_a_resized_patch_as_the_original_to_the_patch():
    """FlexiViT's defining property (enlarging: exact): <resize(x), resample(w)> = <x, w>."""
    kernel, patches = torch.randn(4, 3, 14, 14, dtype=torch.float64), torch.randn(5, 3, 14, 14)
    resized = torch.nn.functional.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True).double()
    original = torch.einsum("ochw,nchw->no", kernel, patches.double())
    # Up to the float32 rounding of the bicubic resize itself.
    torch.testing.assert_close(
        torch.einsum("ochw,nchw->no", resample_patch_kernel(kernel, 16), resized), original, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("grid", [(4, 4), (6, 6), (3, 3)])
def test_position_grid_resize_matches_timm(grid):
    table = torch.randn(25, 8)
    expected = resample_abs_pos_embed(table[None], list(grid), num_prefix_tokens=0)[0]
    torch.testing.assert_close(resize_position_grid(table, (5, 5), grid), expected)


# ---------------------------------------------------------------------- transformers DINOv2 at its own patch size
@pytest.mark.parametrize(
    ("config_class", "model_class", "extra"),
    [
        (Dinov2WithRegistersConfig, Dinov2WithRegistersModel, {"num_register_tokens": 4}),
        # The plain DINOv2 of the 7B start (no registers), with the giant's SwiGLU MLP and without q/k/v biases.
        (Dinov2Config, Dinov2Model, {"use_swiglu_ffn": True, "qkv_bias": False}),
    ],
)
def test_dinov2_trunk_equals_the_backbone_at_its_own_patch_size(tmp_path, config_class, model_class, extra):
    backbone = randomize(model_class(config_class(**TINY_VIT, image_size=56, patch_size=14, **extra)))
    backbone.save_pretrained(tmp_path)
    model = EomtForUniversalSegmentation.from_backbone(str(tmp_path), image_size=56, patch_size=14, **HEADS).eval()

    assert model.config.num_register_tokens == extra.get("num_register_tokens", 0)
    assert model.config.use_swiglu_ffn == extra.get("use_swiglu_ffn", False)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        reference = backbone(pixels, output_hidden_states=True).hidden_states
    assert_states_equal(trunk_states(model, pixels), reference[: len(reference) - HEADS["num_blocks"]])
    # Queries and heads start fresh: the class head has the requested labels and nothing of the backbone.
    assert model.class_predictor.out_features == HEADS["num_labels"] + 1


def test_dinov2_defaults_to_the_papers_patch_size_and_query_blocks(tmp_path):
    config = Dinov2WithRegistersConfig(
        hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=8
    )
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path)
    model = EomtForUniversalSegmentation.from_backbone(str(tmp_path), image_size=64, num_labels=2)
    # Width 384 is DINOv2-S: the paper's 3 query blocks; its 14-pixel kernel resampled to EoMT's 16.
    assert model.config.num_blocks == 3
    assert model.embeddings.patch_embeddings.projection.weight.shape[-1] == 16
    assert model.embeddings.position_embeddings.weight.shape[0] == 16


# --------------------------------------------------------------------------- timm DINOv2, resampled as timm loads it
def timm_dinov2(img_size: int, patch_size: int = 14, arch: str = "vit_small_patch14_reg4_dinov2", **kwargs):
    return timm.create_model(
        arch, pretrained=False, embed_dim=48, depth=3, num_heads=2, img_size=img_size, patch_size=patch_size, **kwargs
    )


def timm_trunk_states(model: torch.nn.Module, pixels: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        hidden = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
        states = [hidden]
        for block in model.blocks[: count - 1]:
            states.append(hidden := block(hidden))
    return tuple(states)


@pytest.mark.parametrize("arch", ["vit_small_patch14_reg4_dinov2", "vit_giant_patch14_reg4_dinov2"])
def test_timm_dinov2_resampled_to_patch_16_equals_timms_loader(tmp_path, arch):
    source = randomize(timm_dinov2(56, arch=arch))
    save_file(source.state_dict(), tmp_path / "dinov2.safetensors")
    model = EomtForUniversalSegmentation.from_backbone(
        str(tmp_path / "dinov2.safetensors"), num_attention_heads=2, image_size=64, patch_size=16, **HEADS
    ).eval()

    # Oracle: timm's own loader (what the original release runs with pretrained=True, patch_size=16).
    oracle = timm_dinov2(64, patch_size=16, arch=arch).eval()
    oracle.load_state_dict(checkpoint_filter_fn(source.state_dict(), oracle))
    pixels = torch.randn(2, 3, 64, 64)
    ours = trunk_states(model, pixels)
    # Our pseudo-inverse runs in float64, timm's in float32: the kernels differ by float32 rounding (~1e-6).
    assert_states_equal(ours, timm_trunk_states(oracle, pixels, len(ours)), tolerance=1e-4)
    assert model.config.use_swiglu_ffn == ("giant" in arch)


def test_timm_folder_with_its_config_reads_the_head_count(tmp_path):
    from timm.models._hub import save_for_hf  # writes config.json (architecture, model_args) + pytorch_model.bin

    source = randomize(timm_dinov2(56))
    save_for_hf(source, tmp_path)
    model = EomtForUniversalSegmentation.from_backbone(str(tmp_path), image_size=56, patch_size=14, **HEADS).eval()
    assert model.config.num_attention_heads == 2
    pixels = torch.randn(1, 3, 56, 56)
    ours = trunk_states(model, pixels)
    assert_states_equal(ours, timm_trunk_states(source, pixels, len(ours)))


# ------------------------------------------------------------------------------------------ DINOv3 → DINOv3 EoMT
@pytest.mark.parametrize("gated", [False, True])
def test_dinov3_trunk_equals_the_backbone(tmp_path, gated):
    config = DINOv3ViTConfig(
        **TINY_VIT, intermediate_size=64, num_register_tokens=2, image_size=64, use_gated_mlp=gated, rope_theta=50.0
    )
    backbone = randomize(DINOv3ViTModel(config))
    backbone.save_pretrained(tmp_path)
    model = EomtForUniversalSegmentation.from_backbone(str(tmp_path), image_size=64, **HEADS).eval()

    assert isinstance(model, EomtDinov3ForUniversalSegmentation)
    assert model.config.layer_norm_eps == config.layer_norm_eps == 1e-5
    assert model.config.rope_parameters["rope_theta"] == 50.0
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = backbone(pixels, output_hidden_states=True).hidden_states
    assert_states_equal(trunk_states(model, pixels), reference[: len(reference) - HEADS["num_blocks"]])


def test_dinov3_mapping_covers_the_whole_trunk(tmp_path):
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_VIT, intermediate_size=64, num_register_tokens=2)).save_pretrained(tmp_path)
    backbone = backbones.find_backbone(tmp_path)
    target = BuiltinDinov3Model(BuiltinDinov3Config(**backbones.merged_fields(backbone, HEADS)))
    assert backbone.read_weights().keys() == eomt_trunk_keys(target)


def test_dinov3_without_a_dinov3_eomt_says_so(tmp_path, monkeypatch):
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_VIT, intermediate_size=64)).save_pretrained(tmp_path)

    def unavailable():
        raise NotImplementedError("no DINOv3 EoMT")

    monkeypatch.setattr(backbones, "dinov3_target", unavailable)
    with pytest.raises(NotImplementedError, match="DINOv3 EoMT"):
        EomtForUniversalSegmentation.from_backbone(str(tmp_path), **HEADS)


# --------------------------------------------------------------------------------------------------------- bad input
def test_unknown_backbone_id_offline_is_one_clear_error():
    with pytest.raises(BackboneError, match="facebook/dinov2-with-registers-nonexistent.*reachable"):
        EomtForUniversalSegmentation.from_backbone("facebook/dinov2-with-registers-nonexistent")


def test_a_clip_vit_is_refused(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**TINY_VIT, intermediate_size=64, image_size=32)).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="clip_vision_model.*not a DINOv2 or DINOv3"):
        EomtForUniversalSegmentation.from_backbone(str(tmp_path), **HEADS)


def test_a_timm_clip_state_dict_is_refused(tmp_path):
    clip = timm.create_model("vit_base_patch16_clip_224", pretrained=False, embed_dim=32, depth=1, num_heads=2)
    save_file(clip.state_dict(), tmp_path / "clip.safetensors")
    with pytest.raises(BackboneError, match="not a timm DINOv2 ViT"):
        EomtForUniversalSegmentation.from_backbone(str(tmp_path / "clip.safetensors"), **HEADS)


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
@pytest.mark.parametrize(("image_size", "patch_size"), [(64, 15), (64, 0), (16, 32), (64, [16, 8])])
def test_a_patch_size_the_resampling_cannot_reach_fails_before_reading_weights(
    tmp_path, family, image_size, patch_size
):
    if family == "dinov2":
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_VIT, patch_size=14)).save_pretrained(tmp_path)
    else:
        DINOv3ViTModel(DINOv3ViTConfig(**TINY_VIT, intermediate_size=64)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # reading the weights would fail with another error
    with pytest.raises(BackboneError, match="patch_size"):
        EomtForUniversalSegmentation.from_backbone(
            str(tmp_path), image_size=image_size, patch_size=patch_size, **HEADS
        )


@pytest.mark.parametrize("override", [{"hidden_size": 64}, {"num_attention_heads": 4}, {"layer_norm_eps": 1e-5}])
def test_an_override_contradicting_the_backbone_is_refused(tmp_path, override):
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_VIT, patch_size=14)).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match=f"{next(iter(override))}=.* contradicts"):
        EomtForUniversalSegmentation.from_backbone(str(tmp_path), **override, **HEADS)


def test_pickled_objects_are_never_loaded(tmp_path):
    torch.save({"cls_token": torch.zeros(1), "extra": object()}, tmp_path / "model.pth")
    with pytest.raises(BackboneError, match="never unpickled"):
        EomtForUniversalSegmentation.from_backbone(str(tmp_path / "model.pth"), **HEADS)


def test_a_state_dict_of_unusual_width_asks_for_the_head_count(tmp_path):
    save_file(timm_dinov2(56).state_dict(), tmp_path / "dinov2.safetensors")
    with pytest.raises(BackboneError, match="Pass num_attention_heads"):
        EomtForUniversalSegmentation.from_backbone(str(tmp_path / "dinov2.safetensors"), **HEADS)
