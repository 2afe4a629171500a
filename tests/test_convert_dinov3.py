"""Conversion of the release's DINOv3 checkpoints, which store the backbone as deltas against a DINOv3 backbone: a
random delta checkpoint with the release's names, merged with a tiny random base in transformers' DINOv3 format,
checked against transformers' built-in EoMT-DINOv3 (the oracle) and the independent reference; every bad input gives
one clear error and writes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from modeling_eomt.convert import ConversionError, convert_checkpoint, reference_forward
from modeling_eomt.convert.__main__ import main
from modeling_eomt.convert.convert import logit_difference, verification_pixels
from PIL import Image
from safetensors.torch import load_file, save_file
from test_convert import release_head
from transformers import DINOv3ViTConfig, DINOv3ViTModel

import modeling_eomt  # registers the Auto classes

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKBONE = "network.encoder.backbone."
TINY_BASE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_register_tokens": 4,
    "image_size": 32,
}


def save_base(folder: Path, seed: int = 0, **overrides) -> DINOv3ViTModel:
    """A random DINOv3 backbone in transformers' format (what `facebook/dinov3-*` holds), saved to `folder`."""
    torch.manual_seed(seed)
    config = DINOv3ViTConfig(**{**TINY_BASE, **overrides})
    model = DINOv3ViTModel(config)
    with torch.no_grad():  # DINOv3's init leaves norms at 1/0 and LayerScale at 1: vary them so a wrong merge shows
        for name, tensor in model.named_parameters():
            if "norm" in name or "lambda1" in name:
                tensor.add_(0.2 * torch.randn_like(tensor))
    model.save_pretrained(folder)
    return model


def release_name(base_name: str) -> str:
    """The release's name of a DINOv3 tensor: it renames `embeddings` to `patch_embed` and `layer` to `blocks`."""
    name = base_name.removeprefix("model.")
    if name.startswith("embeddings."):
        return BACKBONE + "patch_embed." + name.removeprefix("embeddings.")
    if name.startswith("layer."):
        return BACKBONE + "blocks." + name.removeprefix("layer.")
    return BACKBONE + name


def delta_state_dict(
    base: DINOv3ViTModel,
    num_queries: int = 5,
    num_labels: int = 7,
    num_blocks: int = 2,
    stored_probs: float = -1.0,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of a released DINOv3 checkpoint: backbone deltas (small, like a
    fine-tuning's), pixel statistics as zero deltas, heads as stored, `attn_mask_probs` as stored."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 25
        return torch.randn(*shape, generator=generator) * (scale if scale is not None else fan_in**-0.5)

    d = base.config.hidden_size
    sd = {
        "network.attn_mask_probs": torch.full((num_blocks,), stored_probs),
        "network.encoder.pixel_mean": torch.zeros(1, 3, 1, 1),
        "network.encoder.pixel_std": torch.zeros(1, 3, 1, 1),
    }
    for name, tensor in base.state_dict().items():
        if not name.endswith("mask_token"):  # the release deletes it
            sd[release_name(name)] = 0.1 * rand(*tensor.shape, scale=tensor.std().item() if tensor.numel() > 1 else 1)
    sd.update(release_head(rand, d, num_queries, num_labels, 2))
    sd["criterion.empty_weight"] = torch.ones(num_labels + 1)
    return sd


def absolute(sd: dict[str, torch.Tensor], base: DINOv3ViTModel, probs: float = 0.0) -> dict[str, torch.Tensor]:
    """The test's own merge: what the release's loader builds (base + delta in the backbone, ImageNet statistics)."""
    merged = dict(sd)
    for name, tensor in base.state_dict().items():
        if not name.endswith("mask_token"):
            merged[release_name(name)] = tensor + sd[release_name(name)]
    merged["network.encoder.pixel_mean"] = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    merged["network.encoder.pixel_std"] = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    merged["network.attn_mask_probs"] = torch.full_like(sd["network.attn_mask_probs"], probs)
    return merged


@pytest.fixture
def base_dir(tmp_path) -> Path:
    save_base(tmp_path / "dinov3-base")
    return tmp_path / "dinov3-base"


def base_model(base_dir: Path) -> DINOv3ViTModel:
    return DINOv3ViTModel.from_pretrained(base_dir)


def run_cli(*args, capsys) -> tuple[int, str, str]:
    code = main([*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------------ conversion
def test_delta_checkpoint_converts_to_the_builtin_eomt_dinov3_logits(tmp_path, base_dir):
    """Without architecture flags: the weights and the base decide; the built-in EoMT-DINOv3 (the oracle) loads the
    folder and reproduces the independent reference on the test's own merge of base + delta."""
    base = base_model(base_dir)
    sd = delta_state_dict(base)
    torch.save(sd, tmp_path / "last.ckpt")
    result = convert_checkpoint(
        tmp_path / "last.ckpt",
        tmp_path / "out",
        base_backbone=base_dir,
        image_size=32,
        task="panoptic",
        progress=False,
    )
    assert result.max_abs_difference <= 1e-4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "eomt_dinov3" and config["architectures"] == ["EomtDinov3ForUniversalSegmentation"]
    assert (config["num_queries"], len(config["id2label"]), config["num_blocks"]) == (5, 7, 2)
    assert config["layer_norm_eps"] == 1e-5 and config["rope_parameters"]["rope_theta"] == 100.0

    weights = load_file(tmp_path / "out" / "model.safetensors")
    base_sd = base.state_dict()
    k_delta = sd[BACKBONE + "blocks.1.attention.k_proj.weight"]
    torch.testing.assert_close(
        weights["layers.1.attention.k_proj.weight"], base_sd["model.layer.1.attention.k_proj.weight"] + k_delta
    )
    assert "layers.1.attention.k_proj.bias" not in weights and "embeddings.mask_token" not in weights
    torch.testing.assert_close(weights["class_predictor.weight"], sd["network.class_head.weight"])  # as stored
    assert weights["attn_mask_probs"].tolist() == [0.0, 0.0]  # stored -1: a delta against 1

    oracle = transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path / "out").eval()
    pixels = verification_pixels(32)
    reference = reference_forward(absolute(sd, base), pixels, num_heads=2, layer_norm_eps=1e-5)
    assert logit_difference(oracle, reference, pixels, IMAGENET_MEAN, IMAGENET_STD) <= 1e-4
    ours = modeling_eomt.EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path / "out").eval()
    assert logit_difference(ours, reference, pixels, IMAGENET_MEAN, IMAGENET_STD) <= 1e-4


def test_gated_mlp_backbone_converts(tmp_path):
    save_base(tmp_path / "base", use_gated_mlp=True)
    base = base_model(tmp_path / "base")
    torch.save(delta_state_dict(base, num_labels=133), tmp_path / "delta.bin")
    result = convert_checkpoint(
        tmp_path / "delta.bin", tmp_path / "out", base_backbone=tmp_path / "base", image_size=32, progress=False
    )
    assert result.config.use_gated_mlp and result.task == "panoptic"
    assert result.max_abs_difference <= 1e-4


def test_absolute_backbone_weights_are_taken_as_stored(tmp_path, base_dir):
    """A run trained with `delta_weights False` stores absolute weights: told apart from deltas by their size, they
    convert to the same model as the equivalent delta checkpoint."""
    base = base_model(base_dir)
    sd = delta_state_dict(base)
    absolute_sd = {**sd, **{k: v for k, v in absolute(sd, base).items() if k.startswith(BACKBONE)}}
    torch.save(sd, tmp_path / "delta.bin")
    torch.save(absolute_sd, tmp_path / "absolute.bin")
    options = {"base_backbone": base_dir, "image_size": 32, "task": "panoptic", "progress": False}
    convert_checkpoint(tmp_path / "delta.bin", tmp_path / "from_delta", **options)
    result = convert_checkpoint(tmp_path / "absolute.bin", tmp_path / "from_absolute", **options)
    assert result.max_abs_difference <= 1e-4
    from_delta = load_file(tmp_path / "from_delta" / "model.safetensors")
    from_absolute = load_file(tmp_path / "from_absolute" / "model.safetensors")
    assert from_delta.keys() == from_absolute.keys()
    for key in from_delta:
        torch.testing.assert_close(from_absolute[key], from_delta[key])


def test_verification_catches_an_unmerged_backbone(tmp_path, base_dir, monkeypatch):
    """The check is sharp: taking the deltas as the weights (forgetting the base) in our model is caught."""
    from modeling_eomt.convert import convert as convert_module

    real_map = convert_module.map_state_dict
    deltas = delta_state_dict(base_model(base_dir))

    def unmerged(original, config):
        return real_map({**original, **{k: v for k, v in deltas.items() if k.startswith(BACKBONE)}}, config)

    monkeypatch.setattr(convert_module, "map_state_dict", unmerged)
    torch.save(deltas, tmp_path / "delta.bin")
    before = set(tmp_path.iterdir())
    with pytest.raises(ConversionError, match="Verification failed"):
        convert_checkpoint(
            tmp_path / "delta.bin", tmp_path / "out", base_backbone=base_dir, image_size=32, task="panoptic",
            progress=False,
        )  # fmt: skip
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("stored", "flag", "probs"),
    [(-1.0, None, 0.0), (0.0, "raw", 0.0), (0.0, "delta", 1.0), (1.0, None, 1.0)],
    ids=["delta-annealed", "zeros-raw", "zeros-delta", "raw-ones"],
)
def test_attn_mask_probs_storage(tmp_path, base_dir, stored, flag, probs):
    """Decided from the values where they tell (negative: a delta against 1; positive: raw), by the flag where they
    cannot; with masking on (p = 1) the reference and the converted model mask alike."""
    base = base_model(base_dir)
    sd = delta_state_dict(base, stored_probs=stored)
    torch.save(sd, tmp_path / "delta.bin")
    result = convert_checkpoint(
        tmp_path / "delta.bin", tmp_path / "out", base_backbone=base_dir, image_size=32, task="panoptic",
        attn_mask_probs=flag, progress=False,
    )  # fmt: skip
    assert load_file(tmp_path / "out" / "model.safetensors")["attn_mask_probs"].tolist() == [probs, probs]
    assert result.max_abs_difference <= 1e-4
    pixels = verification_pixels(32)
    reference = reference_forward(absolute(sd, base, probs), pixels, num_heads=2, layer_norm_eps=1e-5)
    oracle = transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path / "out").eval()
    assert logit_difference(oracle, reference, pixels, IMAGENET_MEAN, IMAGENET_STD) <= 1e-4  # it masks in eval too
    if probs == 1.0:  # the masked path really ran: it differs from the unmasked reference
        unmasked = reference_forward(absolute(sd, base, 0.0), pixels, num_heads=2, layer_norm_eps=1e-5)
        assert (reference[0] - unmasked[0]).abs().max() > 1e-3


def test_released_name_takes_the_presets_base_backbone(tmp_path, base_dir, monkeypatch):
    """A file named like a released DINOv3 checkpoint needs no flags: the preset supplies size, labels and the base."""
    from modeling_eomt.configuration import presets

    monkeypatch.setitem(presets.BASE_BACKBONES["dinov3"], "small", str(base_dir))
    tiny = {k: v for k, v in TINY_BASE.items() if k not in ("image_size",)} | {"num_blocks": 2, "layer_norm_eps": 1e-5}
    monkeypatch.setitem(presets.DINOV3_SIZES, "small", tiny)
    base = base_model(base_dir)
    sd = delta_state_dict(base, num_queries=200, num_labels=133)
    torch.save(sd, tmp_path / "coco_panoptic_eomt_small_640_dinov3.bin")
    result = convert_checkpoint(tmp_path / "coco_panoptic_eomt_small_640_dinov3.bin", tmp_path / "out", progress=False)
    assert result.config.image_size == 640 and result.task == "panoptic" and result.dataset == "coco_panoptic"
    assert result.max_abs_difference <= 1e-4
    card = (tmp_path / "out" / "README.md").read_text()
    assert "PQ" in card and f"DINOv3 backbone `{base_dir}`" in card and "DINOv3 licence" in card


def test_both_names_of_the_ade20k_release_find_its_preset():
    from modeling_eomt.configuration import PRESETS
    from modeling_eomt.convert.convert import _name

    for source in ("tue-mps/ade_semantic_eomt_large_512_dinov3", "ade20k_semantic_eomt_large_512_dinov3.bin"):
        assert PRESETS[_name(source)].backbone == "dinov3"


def test_semantic_checkpoint_pads_like_the_release_and_runs_in_the_pipeline(tmp_path, base_dir):
    """The DINOv3 release evaluates semantic segmentation on a padded square, not in sliding windows."""
    torch.save(delta_state_dict(base_model(base_dir), num_labels=150), tmp_path / "delta.bin")
    convert_checkpoint(
        tmp_path / "delta.bin",
        tmp_path / "out",
        base_backbone=base_dir,
        image_size=32,
        task="semantic",
        progress=False,
    )
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert not processor["do_split_image"] and processor["do_pad"] and processor["do_reduce_labels"]
    assert processor["size"] == {"shortest_edge": 32, "longest_edge": 32}
    segmenter = transformers.pipeline("image-segmentation", model=str(tmp_path / "out"), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 24, 3), dtype=np.uint8))
    annotations = segmenter(image, subtask="semantic")
    assert annotations and all(item["mask"].size == (24, 40) for item in annotations)


# ------------------------------------------------------------------------------------------------------ bad input
def _no_base(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    return [tmp_path / "delta.bin", "--image-size", "32", "--task", "panoptic"], "--base-backbone NAME_OR_PATH"


def _wrong_size_base(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    save_base(tmp_path / "other", hidden_size=48, intermediate_size=96)
    return [tmp_path / "delta.bin", "--base-backbone", tmp_path / "other", "--image-size", "32"], "does not fit"


def _unrelated_base(tmp_path, base_dir):
    base = base_model(base_dir)
    sd = delta_state_dict(base)
    torch.save({**sd, **{k: v for k, v in absolute(sd, base).items() if k.startswith(BACKBONE)}}, tmp_path / "abs.bin")
    save_base(tmp_path / "other", seed=7)  # the same architecture, other weights: absolute ones are far from it
    args = [tmp_path / "abs.bin", "--base-backbone", tmp_path / "other", "--image-size", "32"]
    return args, "neither deltas against the base backbone"


def _shallower_base(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    save_base(tmp_path / "other", num_hidden_layers=2)
    return [tmp_path / "delta.bin", "--base-backbone", tmp_path / "other", "--image-size", "32"], "2 layers"


def _base_with_unknown_rope(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    config = json.loads((base_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0}
    (base_dir / "config.json").write_text(json.dumps(config))
    return [tmp_path / "delta.bin", "--base-backbone", base_dir, "--image-size", "32"], "RoPE type 'linear'"


def _release_config_with_unknown_rope(tmp_path, base_dir):
    folder = tmp_path / "release"
    folder.mkdir()
    torch.save(delta_state_dict(base_model(base_dir)), folder / "pytorch_model.bin")
    config = {"model_type": "eomt_dinov3", "image_size": 32, "rope_parameters": {"rope_type": "yarn"}}
    (folder / "config.json").write_text(json.dumps(config))
    return [folder, "--base-backbone", base_dir, "--task", "panoptic"], "RoPE type 'yarn'"


def _base_not_dinov3(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2).save_pretrained(
        tmp_path / "dinov2"
    )
    return [tmp_path / "delta.bin", "--base-backbone", tmp_path / "dinov2", "--image-size", "32"], "not DINOv3"


def _silu_base(tmp_path, base_dir):
    save_base(tmp_path / "base", use_gated_mlp=True, hidden_act="silu")
    torch.save(delta_state_dict(base_model(tmp_path / "base")), tmp_path / "delta.bin")
    return [tmp_path / "delta.bin", "--base-backbone", tmp_path / "base", "--image-size", "32"], "GELU MLP"


def _incomplete_base(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    weights = load_file(base_dir / "model.safetensors")
    del weights["layer.2.mlp.up_proj.weight"]
    save_file(weights, base_dir / "model.safetensors", metadata={"format": "pt"})
    return [tmp_path / "delta.bin", "--base-backbone", base_dir, "--image-size", "32"], "lacks 1 weights"


def _missing_base(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    return [tmp_path / "delta.bin", "--base-backbone", tmp_path / "nowhere", "--image-size", "32"], "does not exist"


def _offline_base_hub_id(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    args = [
        tmp_path / "delta.bin",
        "--base-backbone",
        "facebook/dinov3-vits16-pretrain-lvd1689m",
        "--image-size",
        "32",
    ]
    return args, "Cannot load the base backbone facebook/dinov3-vits16-pretrain-lvd1689m"


def _ambiguous_mask_probs(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir), stored_probs=0.0), tmp_path / "delta.bin")
    args = [tmp_path / "delta.bin", "--base-backbone", base_dir, "--image-size", "32", "--task", "panoptic"]
    return args, "--attn-mask-probs raw"


def _probs_out_of_range(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir), stored_probs=-1.0), tmp_path / "delta.bin")
    args = [tmp_path / "delta.bin", "--base-backbone", base_dir, "--image-size", "32", "--attn-mask-probs", "raw"]
    return args, "outside [0, 1]"


def _no_image_size(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    return [tmp_path / "delta.bin", "--base-backbone", base_dir, "--task", "panoptic"], "--image-size"


def _timm_backbone_flag(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    return [tmp_path / "delta.bin", "--backbone", "large", "--image-size", "32"], "--base-backbone instead"


def _dinov2_preset(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    args = [tmp_path / "delta.bin", "--base-backbone", base_dir, "--preset", "coco_panoptic_eomt_large_640"]
    return args, "pick a DINOv3 preset"


def _contradicting_flag(tmp_path, base_dir):
    torch.save(delta_state_dict(base_model(base_dir)), tmp_path / "delta.bin")
    args = [tmp_path / "delta.bin", "--base-backbone", base_dir, "--image-size", "32", "--num-queries", "9"]
    return args, "num_queries=5"


@pytest.mark.parametrize(
    "make_case",
    [
        _no_base,
        _wrong_size_base,
        _shallower_base,
        _unrelated_base,
        _base_with_unknown_rope,
        _release_config_with_unknown_rope,
        _base_not_dinov3,
        _silu_base,
        _incomplete_base,
        _missing_base,
        _offline_base_hub_id,
        _ambiguous_mask_probs,
        _probs_out_of_range,
        _no_image_size,
        _timm_backbone_flag,
        _dinov2_preset,
        _contradicting_flag,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, base_dir, capsys, make_case):
    args, message = make_case(tmp_path, base_dir)
    capsys.readouterr()  # the setup's own progress bars
    before = set(tmp_path.iterdir())
    code, _, err = run_cli(*args, tmp_path / "converted" / "out", capsys=capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eomt-convert: error: ") and message in lines[0], err
    assert set(tmp_path.iterdir()) == before, "a failed conversion must leave no files behind"
