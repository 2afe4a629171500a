"""EomtConfig: the built-in's fields and defaults, presets of the released checkpoints (bad fields: test_bad_inputs.py)."""

import dataclasses
import json

import pytest
import torch
import transformers
from modeling_eomt.configuration import PRESETS

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation

BuiltinConfig = transformers.models.eomt.EomtConfig  # oracle


def test_fields_and_defaults_match_builtin():
    ours, builtin = EomtConfig(), BuiltinConfig()
    builtin_fields = {f.name for f in dataclasses.fields(BuiltinConfig)}
    for name in builtin_fields:
        assert getattr(ours, name) == getattr(builtin, name), name


def test_builtin_config_json_loads_unchanged(tmp_path):
    builtin = BuiltinConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_blocks=3, num_labels=133)
    builtin.save_pretrained(tmp_path)
    ours = EomtConfig.from_pretrained(tmp_path)
    assert (ours.hidden_size, ours.num_blocks, ours.num_labels) == (384, 3, 133)
    saved = json.loads((tmp_path / "config.json").read_text())
    ours.save_pretrained(tmp_path / "ours")
    again = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key, value in saved.items():
        if key not in ("transformers_version", "architectures"):
            assert again[key] == value, key


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_consistent_config(name):
    preset = PRESETS[name]
    config = EomtConfig.from_preset(name)
    assert config.num_queries == (100 if preset.task == "semantic" else 200)
    assert config.image_size == preset.image_size
    assert config.num_blocks == {"small": 3, "base": 3, "large": 4, "giant": 5}[preset.size]
    assert (
        config.num_labels
        == {
            "coco_panoptic": 133,
            "coco_instance": 80,
            "ade20k_panoptic": 150,
            "ade20k_semantic": 150,
            "cityscapes_semantic": 19,
        }[preset.labels]
    )
    assert name in EomtConfig.list_presets()


def test_large_640_preset_has_the_papers_size():
    config = EomtConfig.from_preset("coco_panoptic_eomt_large_640")
    with torch.device("meta"):
        model = EomtForUniversalSegmentation(config)
    params = sum(p.numel() for p in model.parameters())
    assert 300e6 < params < 330e6  # ≈ 316 M in the paper


def test_giant_preset_uses_swiglu_with_4096_hidden():
    config = EomtConfig.from_preset("coco_panoptic_eomt_giant_640")
    with torch.device("meta"):
        model = EomtForUniversalSegmentation(config)
    assert model.layers[0].mlp.gate_proj.weight.shape == (4096, 1536)


def test_preset_overrides_and_unknown_preset():
    assert EomtConfig.from_preset("ade20k_semantic_eomt_large_512", num_labels=3).num_labels == 3
    with pytest.raises(ValueError, match="Unknown preset 'nope'.*coco_panoptic_eomt_large_640"):
        EomtConfig.from_preset("nope")


def test_unrelated_extra_keys_are_kept():
    assert EomtConfig(written_by="another tool").written_by == "another tool"


def test_dinov3_presets_name_their_base_backbone_and_build_dinov3_configs():
    from modeling_eomt import EomtDinov3Config

    details = {preset["name"]: preset for preset in EomtConfig.list_presets(details=True)}
    assert set(details) == set(EomtConfig.list_presets())
    dinov3 = {name: preset for name, preset in details.items() if preset["backbone"] == "dinov3"}
    assert len(dinov3) == 7
    large = dinov3["coco_panoptic_eomt_large_640_dinov3"]
    assert large["base_backbone"] == "facebook/dinov3-vitl16-pretrain-lvd1689m" and large["result"] == 56.8
    assert not dinov3["ade20k_semantic_eomt_large_512_dinov3"]["sliding_windows"]  # it pads a square
    assert details["ade20k_semantic_eomt_large_512"]["sliding_windows"]
    config = EomtConfig.from_preset("coco_panoptic_eomt_small_640_dinov3")
    assert type(config) is EomtDinov3Config
    assert (config.hidden_size, config.num_blocks, config.num_queries, config.num_labels) == (384, 3, 200, 133)
    assert config.intermediate_size == 1536 and config.key_bias is False
