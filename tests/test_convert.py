"""Conversion of original-release checkpoints: every source form, logits against the independent reference, loading
through the Auto classes and the pipeline, verification and atomic replacement. Bad inputs: test_bad_inputs.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from modeling_eomt.configuration import EomtConfig
from modeling_eomt.configuration.labels import id2label
from modeling_eomt.convert import ConversionError, convert_checkpoint, reference_forward
from modeling_eomt.convert.__main__ import main
from modeling_eomt.convert.convert import logit_difference, verification_pixels
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForUniversalSegmentation, pipeline

import modeling_eomt  # noqa: F401  (registers the Auto classes)

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_blocks": 2,
    "image_size": 32,
    "num_queries": 5,
    "num_labels": 7,
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def original_state_dict(
    hidden_size: int = 32,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 2,
    num_blocks: int = 2,
    image_size: int = 32,
    num_queries: int = 5,
    num_labels: int = 7,
    patch_size: int = 16,
    swiglu: bool = False,
    mask_probs: float = 0.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of the original release's LightningModule state dict."""
    del num_attention_heads  # not visible in the tensors
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
        # Fan-in scaling keeps activations O(1) through the blocks, so fp32 rounding stays far below the tolerance.
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 25
        return torch.randn(*shape, generator=generator) * (scale if scale is not None else fan_in**-0.5)

    d, grid = hidden_size, (image_size // patch_size) ** 2
    backbone = "network.encoder.backbone."
    sd = {
        "network.attn_mask_probs": torch.full((num_blocks,), mask_probs),
        "network.encoder.pixel_mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        "network.encoder.pixel_std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
        backbone + "cls_token": rand(1, 1, d),
        backbone + "reg_token": rand(1, 4, d),
        backbone + "pos_embed": rand(1, grid, d),
        backbone + "patch_embed.proj.weight": rand(d, 3, patch_size, patch_size),
        backbone + "patch_embed.proj.bias": rand(d),
        backbone + "norm.weight": 1 + rand(d),
        backbone + "norm.bias": rand(d),
    }
    hidden = 4 * d
    for i in range(num_hidden_layers):
        block = f"{backbone}blocks.{i}."
        sd.update(
            {
                block + "norm1.weight": 1 + rand(d),
                block + "norm1.bias": rand(d),
                block + "attn.qkv.weight": rand(3 * d, d),
                block + "attn.qkv.bias": rand(3 * d),
                block + "attn.proj.weight": rand(d, d),
                block + "attn.proj.bias": rand(d),
                block + "ls1.gamma": 1 + rand(d),
                block + "norm2.weight": 1 + rand(d),
                block + "norm2.bias": rand(d),
                block + "ls2.gamma": 1 + rand(d),
            }
        )
        if swiglu:  # timm SwiGLUPacked: fc1 rows hold gate then up; DINOv2 rounds 2/3 of 4d up to a multiple of 8
            packed = (int(hidden * 2 / 3) + 7) // 8 * 8
            sd.update(
                {
                    block + "mlp.fc1.weight": rand(2 * packed, d),
                    block + "mlp.fc1.bias": rand(2 * packed),
                    block + "mlp.fc2.weight": rand(d, packed),
                    block + "mlp.fc2.bias": rand(d),
                }
            )
        else:
            sd.update(
                {
                    block + "mlp.fc1.weight": rand(hidden, d),
                    block + "mlp.fc1.bias": rand(hidden),
                    block + "mlp.fc2.weight": rand(d, hidden),
                    block + "mlp.fc2.bias": rand(d),
                }
            )
    sd.update(release_head(rand, d, num_queries, num_labels, max(1, int(math.log2(patch_size)) - 2)))
    empty_weight = torch.ones(num_labels + 1)
    empty_weight[-1] = 0.1
    sd["criterion.empty_weight"] = empty_weight
    return sd


def release_head(rand, d: int, num_queries: int, num_labels: int, num_upscale: int) -> dict[str, torch.Tensor]:
    """Queries and heads of an original-release state dict (`network.` names), drawn with `rand(*shape, scale=...)`."""
    head = {"network.q.weight": rand(num_queries, d, scale=1.0)}
    head["network.class_head.weight"], head["network.class_head.bias"] = rand(num_labels + 1, d), rand(num_labels + 1)
    for i in (0, 2, 4):
        head[f"network.mask_head.{i}.weight"], head[f"network.mask_head.{i}.bias"] = rand(d, d), rand(d)
    for i in range(num_upscale):
        up = f"network.upscale.{i}."
        head.update(
            {
                up + "conv1.weight": rand(d, d, 2, 2),
                up + "conv1.bias": rand(d),
                up + "conv2.weight": rand(d, 1, 3, 3, scale=0.3),
                up + "norm.weight": 1 + rand(d),
                up + "norm.bias": rand(d),
            }
        )
    return head


def original_config(size: str = "small", **arch) -> dict:
    """The original `config.json` of a Hub folder, for the architecture of `original_state_dict(**arch)`."""
    arch = {**TINY, **arch}
    return {
        "backbone": f"vit_{size}_patch14_reg4_dinov2",
        "image_size": [arch["image_size"]] * 2,
        "patch_size": 16,
        "num_queries": arch["num_queries"],
        "num_blocks": arch["num_blocks"],
        "num_labels": arch["num_labels"],
    }


def tiny_flags(**arch) -> dict:
    """Options of `convert_checkpoint` for a tiny architecture (the backbone size only gives the head count)."""
    arch = {**TINY, **arch}
    return {
        "image_size": arch["image_size"],
        "num_queries": arch["num_queries"],
        "num_labels": arch["num_labels"],
        "num_blocks": arch["num_blocks"],
    }


def use_tiny_sizes(monkeypatch) -> None:
    """Make "small" a 32-wide, 3-block, 2-head ViT and "giant" its SwiGLU twin, so tests run in milliseconds."""
    from modeling_eomt.configuration import presets

    tiny = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "num_blocks": 2}
    monkeypatch.setitem(presets.SIZES, "small", tiny)
    monkeypatch.setitem(presets.SIZES, "giant", {**tiny, "hidden_size": 48, "use_swiglu_ffn": True})


@pytest.fixture(autouse=True)
def tiny_sizes(monkeypatch):
    use_tiny_sizes(monkeypatch)


def converted_logits(output_dir: Path, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = AutoModelForUniversalSegmentation.from_pretrained(output_dir).eval()
    normalised = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        output = model(pixel_values=normalised)
    return output.masks_queries_logits, output.class_queries_logits


def assert_matches_reference(output_dir: Path, sd: dict, num_heads: int = 2, seed: int = 1) -> None:
    side = int(sd["network.encoder.backbone.pos_embed"].shape[1] ** 0.5) * 16
    pixels = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
    ref_masks, ref_classes = reference_forward(sd, pixels, num_heads)
    masks, classes = converted_logits(output_dir, pixels)
    assert masks.shape == ref_masks.shape and classes.shape == ref_classes.shape
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=0)
    torch.testing.assert_close(classes, ref_classes, atol=1e-4, rtol=0)


def save_folder(folder: Path, sd: dict, config: dict | None = None, shards: int = 1) -> Path:
    """An original Hub folder: pytorch_model.bin (or `shards` bins + index) and the original config.json."""
    folder.mkdir(parents=True)
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        keys, weight_map = list(sd), {}
        for index in range(shards):
            name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
            part = keys[index::shards]
            torch.save({key: sd[key] for key in part}, folder / name)
            weight_map.update(dict.fromkeys(part, name))
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    code = main([*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_written(directory: Path, before: set[Path]) -> None:
    assert set(directory.iterdir()) == before, "a failed conversion must leave no files behind"


# ------------------------------------------------------------------------------------------ reference vs built-in
@pytest.mark.parametrize("swiglu", [False, True], ids=["gelu", "packed-swiglu"])
def test_reference_forward_matches_builtin_eomt(swiglu):
    """The functional reference agrees with transformers' own EoMT given hand-mapped weights (the oracle)."""
    arch = {**TINY, "hidden_size": 48 if swiglu else 32}
    sd = original_state_dict(**arch, swiglu=swiglu)
    config = transformers.EomtConfig(**arch, patch_size=16, use_swiglu_ffn=swiglu)
    oracle = transformers.EomtForUniversalSegmentation(config).eval()
    b = "network.encoder.backbone."
    weights = {
        "embeddings.cls_token": sd[b + "cls_token"],
        "embeddings.register_tokens": sd[b + "reg_token"],
        "embeddings.position_embeddings.weight": sd[b + "pos_embed"][0],
        "embeddings.patch_embeddings.projection.weight": sd[b + "patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd[b + "patch_embed.proj.bias"],
        "layernorm.weight": sd[b + "norm.weight"],
        "layernorm.bias": sd[b + "norm.bias"],
        "query.weight": sd["network.q.weight"],
        "class_predictor.weight": sd["network.class_head.weight"],
        "class_predictor.bias": sd["network.class_head.bias"],
        "attn_mask_probs": torch.zeros(2),
    }
    for p in ("weight", "bias"):
        for i, name in ((0, "fc1"), (2, "fc2"), (4, "fc3")):
            weights[f"mask_head.{name}.{p}"] = sd[f"network.mask_head.{i}.{p}"]
        for i in range(2):
            weights[f"upscale_block.block.{i}.conv1.{p}"] = sd[f"network.upscale.{i}.conv1.{p}"]
            weights[f"upscale_block.block.{i}.layernorm2d.{p}"] = sd[f"network.upscale.{i}.norm.{p}"]
        for n in range(3):
            layer, block = f"layers.{n}.", f"{b}blocks.{n}."
            q, k, v = sd[block + f"attn.qkv.{p}"].chunk(3)
            weights.update(
                {
                    layer + f"attention.q_proj.{p}": q,
                    layer + f"attention.k_proj.{p}": k,
                    layer + f"attention.v_proj.{p}": v,
                    layer + f"attention.out_proj.{p}": sd[block + f"attn.proj.{p}"],
                    layer + f"norm1.{p}": sd[block + f"norm1.{p}"],
                    layer + f"norm2.{p}": sd[block + f"norm2.{p}"],
                }
            )
            if swiglu:
                gate, up = sd[block + f"mlp.fc1.{p}"].chunk(2)
                weights.update(
                    {
                        layer + f"mlp.gate_proj.{p}": gate,
                        layer + f"mlp.up_proj.{p}": up,
                        layer + f"mlp.down_proj.{p}": sd[block + f"mlp.fc2.{p}"],
                    }
                )
            else:
                weights.update(
                    {
                        layer + f"mlp.fc1.{p}": sd[block + f"mlp.fc1.{p}"],
                        layer + f"mlp.fc2.{p}": sd[block + f"mlp.fc2.{p}"],
                    }
                )
    for i in range(2):
        weights[f"upscale_block.block.{i}.conv2.weight"] = sd[f"network.upscale.{i}.conv2.weight"]
    for n in range(3):
        weights[f"layers.{n}.layer_scale1.lambda1"] = sd[f"{b}blocks.{n}.ls1.gamma"]
        weights[f"layers.{n}.layer_scale2.lambda1"] = sd[f"{b}blocks.{n}.ls2.gamma"]
    missing, unexpected = oracle.load_state_dict(weights, strict=False)
    assert set(missing) <= {"criterion.empty_weight"} and not unexpected

    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    normalised = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = oracle(pixel_values=normalised)
    masks, classes = reference_forward(sd, pixels, num_heads=2)
    torch.testing.assert_close(masks, expected.masks_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(classes, expected.class_queries_logits, atol=1e-4, rtol=0)


def test_reference_rejects_mid_annealing_checkpoint():
    with pytest.raises(ValueError, match="mid-annealing"):
        reference_forward(original_state_dict(mask_probs=0.5), torch.rand(1, 3, 32, 32), num_heads=2)


# ------------------------------------------------------------------------------------------------- source forms
def _folder(tmp_path, sd):
    return save_folder(tmp_path / "ckpt", sd, original_config()), {"task": "panoptic"}


def _sharded(tmp_path, sd):
    return save_folder(tmp_path / "ckpt", sd, original_config(), shards=3), {"task": "panoptic"}


def _bin(tmp_path, sd):
    torch.save(sd, tmp_path / "weights.bin")
    return tmp_path / "weights.bin", dict(backbone="vit_small_patch14_reg4_dinov2", task="panoptic", **tiny_flags())


def _pt(tmp_path, sd):
    torch.save(sd, tmp_path / "weights.pt")
    return tmp_path / "weights.pt", dict(backbone="small", task="panoptic", **tiny_flags())


def _lightning(tmp_path, sd):
    checkpoint = {"state_dict": sd, "epoch": 11, "global_step": 88_000, "optimizer_states": [], "lr_schedulers": []}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt", dict(backbone="small", task="panoptic", **tiny_flags())


def _compiled(tmp_path, sd):
    compiled = {key.replace("network.", "network._orig_mod."): value for key, value in sd.items()}
    torch.save({"state_dict": compiled}, tmp_path / "compiled.ckpt")
    return tmp_path / "compiled.ckpt", dict(backbone="small", task="panoptic", **tiny_flags())


def _safetensors(tmp_path, sd):
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in sd.items()}, tmp_path / "weights.safetensors")
    return tmp_path / "weights.safetensors", dict(backbone="small", task="panoptic", **tiny_flags())


@pytest.mark.parametrize(
    "make_source",
    [_folder, _sharded, _bin, _pt, _lightning, _compiled, _safetensors],
    ids=["folder", "sharded-folder", "bin", "pt", "lightning-ckpt", "orig_mod", "safetensors"],
)
def test_every_source_form_converts_to_reference_logits(tmp_path, make_source):
    sd = original_state_dict(seed=7)
    source, options = make_source(tmp_path, sd)
    result = convert_checkpoint(source, tmp_path / "out", progress=False, **options)
    assert result.max_abs_difference is not None and result.max_abs_difference <= 1e-4
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
    }
    assert_matches_reference(tmp_path / "out", sd)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.mark.parametrize(
    "arch",
    [
        {},
        {
            "num_blocks": 1,
            "image_size": 48,
            "num_queries": 3,
            "num_labels": 4,
            "mask_probs": 1.0,
        },  # masked attention at inference
        {"size": "giant", "hidden_size": 48, "swiglu": True},  # packed SwiGLU
        {"size": "giant", "hidden_size": 48, "swiglu": True, "num_blocks": 3, "mask_probs": 1.0},
    ],
    ids=["small", "small-masked-attention", "giant-swiglu", "giant-swiglu-masked"],
)
def test_sizes_convert_to_reference_logits(tmp_path, arch):
    arch = dict(arch)
    size = arch.pop("size", "small")
    mask_probs, swiglu = arch.pop("mask_probs", 0.0), arch.pop("swiglu", False)
    sd = original_state_dict(**{**TINY, **arch}, swiglu=swiglu, mask_probs=mask_probs)
    flags = {key: value for key, value in arch.items() if key != "hidden_size"}
    source = save_folder(tmp_path / "ckpt", sd, original_config(size, **flags))
    convert_checkpoint(source, tmp_path / "out", task="panoptic", progress=False)
    assert_matches_reference(tmp_path / "out", sd)
    weights = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(weights["attn_mask_probs"], sd["network.attn_mask_probs"])
    if swiglu:
        gate, up = sd["network.encoder.backbone.blocks.1.mlp.fc1.weight"].chunk(2)
        assert torch.equal(weights["layers.1.mlp.gate_proj.weight"], gate)
        assert torch.equal(weights["layers.1.mlp.up_proj.weight"], up)


def test_lightning_checkpoint_converts_without_flags(tmp_path):
    """Every architecture field comes from the weights: width, depth (heads from the width's size), native size
    from the position embedding, queries and labels from the head, masked blocks from `attn_mask_probs`."""
    sd = original_state_dict(image_size=48, num_queries=6, num_labels=133, num_blocks=1, seed=4)
    torch.save({"state_dict": sd}, tmp_path / "last.ckpt")
    result = convert_checkpoint(tmp_path / "last.ckpt", tmp_path / "out", progress=False)
    config = result.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 3, 2)
    assert (config.image_size, config.num_queries, config.num_labels, config.num_blocks) == (48, 6, 133, 1)
    assert result.task == "panoptic" and result.max_abs_difference <= 1e-4
    assert_matches_reference(tmp_path / "out", sd)


def test_builtin_eomt_loads_the_converted_folder_with_the_same_logits(tmp_path):
    sd = original_state_dict(seed=5)
    source = save_folder(tmp_path / "ckpt", sd, original_config())
    convert_checkpoint(source, tmp_path / "out", task="panoptic", progress=False)
    oracle = transformers.EomtForUniversalSegmentation.from_pretrained(tmp_path / "out").eval()
    pixels = verification_pixels(32)
    reference = reference_forward(sd, pixels, num_heads=2)
    assert logit_difference(oracle, reference, pixels, IMAGENET_MEAN, IMAGENET_STD) <= 1e-4


def test_swapped_swiglu_halves_fail_verification(tmp_path, monkeypatch):
    """The check is sharp: mapping the packed fc1 halves the wrong way round is caught and nothing is written."""
    from modeling_eomt.convert import mapping

    swapped = [
        (source, tuple(reversed(targets))) if "mlp.fc1" in source else (source, targets)
        for source, targets in mapping._DINOV2_RULES[True]
    ]
    monkeypatch.setitem(mapping._DINOV2_RULES, True, swapped)
    sd = original_state_dict(hidden_size=48, swiglu=True)
    source = save_folder(tmp_path / "ckpt", sd, original_config("giant"))
    before = set(tmp_path.iterdir())
    with pytest.raises(ConversionError, match="Verification failed"):
        convert_checkpoint(source, tmp_path / "out", task="panoptic", progress=False)
    assert_nothing_written(tmp_path, before)


# ------------------------------------------------------------------------------------------- outputs and options
def test_preset_conversion_writes_labels_processor_and_model_card(tmp_path):
    # The "small" size is shrunk by the fixture, so the released 640-pixel preset stays cheap.
    sd = original_state_dict(image_size=640, num_queries=200, num_labels=133, num_blocks=2)
    source = save_folder(tmp_path / "coco_panoptic_eomt_small_640_2x", sd, config=None)
    result = convert_checkpoint(source, tmp_path / "out", progress=False)  # preset inferred from the folder name
    assert result.task == "panoptic" and result.dataset == "coco_panoptic"

    config = EomtConfig.from_pretrained(tmp_path / "out")
    assert config.id2label[0] == "person" and config.id2label[132] == "rug-merged"
    assert config.image_size == 640 and config.num_queries == 200
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["do_pad"] is True and processor["do_split_image"] is False
    assert processor["size"] == {"shortest_edge": 640, "longest_edge": 640}
    card = (tmp_path / "out" / "README.md").read_text()
    for needle in (
        "pipeline_tag: image-segmentation",
        "library_name: transformers",
        "model-index:",
        "value: 46.7",
        "type: pq",
        "@inproceedings{kerssies2025eomt",
        'pipeline("image-segmentation"',
    ):
        assert needle in card, needle


def test_semantic_task_writes_sliding_window_processor_and_runs_in_the_pipeline(tmp_path):
    sd = original_state_dict(num_labels=19, num_queries=4)
    source = save_folder(tmp_path / "ckpt", sd, original_config(num_labels=19, num_queries=4))
    result = convert_checkpoint(source, tmp_path / "out", task="semantic", progress=False)
    assert result.dataset == "cityscapes_semantic"
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["do_split_image"] is True and processor["size"]["shortest_edge"] == 32
    # Cityscapes train ids: 0 is road, 255 void
    assert processor["ignore_index"] == 255 and processor["do_reduce_labels"] is False

    segmenter = pipeline("image-segmentation", model=str(tmp_path / "out"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8))
    segments = segmenter(image, subtask="semantic")
    assert segments, "semantic segmentation labels every pixel"
    names = set(id2label("cityscapes_semantic").values())
    assert {segment["label"] for segment in segments} <= names
    assert all(segment["mask"].size == (72, 40) for segment in segments)


def test_panoptic_conversion_runs_in_the_pipeline(tmp_path):
    sd = original_state_dict(num_labels=133)
    source = save_folder(tmp_path / "ckpt", sd, original_config(num_labels=133))
    convert_checkpoint(source, tmp_path / "out", progress=False)  # task follows from 133 labels (COCO panoptic)
    segmenter = pipeline("image-segmentation", model=str(tmp_path / "out"))
    assert type(segmenter.model).__module__.startswith("modeling_eomt")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 30, 3), dtype=np.uint8))
    segments = segmenter(image, subtask="panoptic", threshold=0.0)
    names = set(id2label("coco_panoptic").values())
    assert segments and all(segment["label"] in names and segment["mask"].size == (30, 50) for segment in segments)


def test_ade20k_semantic_targets_reduce_labels(tmp_path):
    sd = original_state_dict(num_labels=150, num_queries=4)
    source = save_folder(tmp_path / "ckpt", sd, original_config(num_labels=150, num_queries=4))
    assert convert_checkpoint(source, tmp_path / "out", task="semantic", progress=False).dataset == "ade20k_semantic"
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["ignore_index"] == 255 and processor["do_reduce_labels"] is True  # ADE20K files: 0 is "other"


def test_release_config_aliases_and_patch_size(tmp_path):
    """The release's training arguments name fields `backbone_name` and `img_size`; a patch-8 model has one
    upscale block (log2(8) - 2)."""
    sd = original_state_dict(patch_size=8, image_size=32)
    config = {**original_config(), "patch_size": 8}
    config["backbone_name"], config["img_size"] = config.pop("backbone"), config.pop("image_size")
    source = save_folder(tmp_path / "ckpt", sd, config)
    result = convert_checkpoint(source, tmp_path / "out", task="panoptic", verify=False, progress=False)
    assert (result.config.patch_size, result.config.num_upscale_blocks, result.config.image_size) == (8, 1, 32)
    model = AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        masks = model(pixel_values=torch.rand(1, 3, 32, 32)).masks_queries_logits
    assert masks.shape[-2:] == (8, 8)  # the 4×4 patch grid upscaled once


def fake_hub(monkeypatch, repo: Path) -> list[list[str]]:
    """`snapshot_download` serving `repo` (files filtered by `allow_patterns`); returns the patterns of each call."""
    import fnmatch

    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(allow_patterns)
        folder = Path(tempfile.mkdtemp(dir=repo.parent))
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, folder / file.name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_repo_with_original_and_converted_weights_converts_the_original(tmp_path, monkeypatch):
    sd = original_state_dict(image_size=640, num_queries=200, num_labels=133, num_blocks=2)
    repo = save_folder(tmp_path / "repo", sd)
    convert_checkpoint(repo, tmp_path / "copy", preset="coco_panoptic_eomt_small_640_2x", verify=False, progress=False)
    for name in ("config.json", "model.safetensors"):  # the converted copy the release's repos also hold
        shutil.copy(tmp_path / "copy" / name, repo / name)
    calls = fake_hub(monkeypatch, repo)
    result = convert_checkpoint("tue-mps/coco_panoptic_eomt_small_640_2x", tmp_path / "out", progress=False)
    assert result.dataset == "coco_panoptic" and result.max_abs_difference <= 1e-4
    assert len(calls) == 1 and not any("safetensors" in pattern for pattern in calls[0])  # the copy is not fetched

    (repo / "pytorch_model.bin").unlink()  # only the converted copy: nothing to convert, nothing big downloaded
    calls.clear()
    with pytest.raises(ConversionError, match="already in the Transformers format"):
        convert_checkpoint("tue-mps/coco_panoptic_eomt_small_640_2x", tmp_path / "out2", progress=False)
    assert len(calls) == 1


def test_release_folder_converts_what_its_transformers_config_says(tmp_path):
    """A folder holding the original weights beside a Transformers config.json: that config supplies what the weights
    leave open (here the head count) and its label names' count agrees with the class head."""
    sd = original_state_dict(hidden_size=48, num_labels=133, seed=6)
    folder = save_folder(tmp_path / "my_release", sd)
    config = EomtConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, num_blocks=2, image_size=32)
    config.num_queries, config.id2label = 5, {i: f"class {i}" for i in range(133)}
    config.save_pretrained(folder)
    result = convert_checkpoint(folder, tmp_path / "out", progress=False)
    assert result.config.num_attention_heads == 3 and result.max_abs_difference <= 1e-4
    assert_matches_reference(tmp_path / "out", sd, num_heads=3)


def test_hub_repo_with_original_safetensors(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    save_file(original_state_dict(), repo / "model.safetensors")
    calls = fake_hub(monkeypatch, repo)
    convert_checkpoint("someone/my_eomt", tmp_path / "out", backbone="small", task="panoptic", progress=False, **tiny_flags())  # fmt: skip
    assert len(calls) == 2 and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("dtype", "verify_dtype"), [("float32", "float32"), ("float16", "float64"), ("bfloat16", "float64")]
)
def test_output_dtypes_are_verified_and_load(tmp_path, dtype, verify_dtype):
    sd = original_state_dict()
    source = save_folder(tmp_path / "ckpt", sd, original_config())
    result = convert_checkpoint(
        source, tmp_path / "out", task="panoptic", dtype=dtype, verify_dtype=verify_dtype, progress=False
    )
    # float64 arithmetic leaves only the rounding of the inputs; float32 adds its own (still far below 1e-4 here).
    assert result.max_abs_difference <= (1e-4 if verify_dtype == "float32" else 1e-6)
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {getattr(torch, dtype)}
    model = AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "out")
    assert model.dtype == getattr(torch, dtype)


def test_large_outputs_are_sharded_with_an_index(tmp_path, monkeypatch):
    from modeling_eomt.convert import convert as convert_module

    monkeypatch.setattr(convert_module, "MAX_SHARD_SIZE", "60KB")
    sd = original_state_dict()
    source = save_folder(tmp_path / "ckpt", sd, original_config())
    convert_checkpoint(source, tmp_path / "out", task="panoptic", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "out" / shard).is_file() for shard in shards)
    assert "layers.0.attention.k_proj.weight" in index["weight_map"]
    assert_matches_reference(tmp_path / "out", sd)


def test_overwrite_replaces_a_non_empty_output(tmp_path, capsys, monkeypatch):
    source = save_folder(tmp_path / "ckpt", original_state_dict(), original_config())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")

    import modeling_eomt.convert.convert as convert_module

    replace = os.replace
    calls = []

    def rename_fails_once_the_old_folder_is_aside(source_path, target_path):
        calls.append(1)
        if len(calls) == 2:  # staging → out, after out → aside
            raise OSError(5, "I/O error")
        replace(source_path, target_path)

    with monkeypatch.context() as patch:
        patch.setattr(convert_module.os, "replace", rename_fails_once_the_old_folder_is_aside)
        code, _, err = run_cli(source, tmp_path / "out", "--task", "panoptic", "--overwrite", capsys=capsys)
    assert code == 1 and err.strip() == "eomt-convert: error: [Errno 5] I/O error"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or aside folder left
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]  # the old output is back, whole

    code, out, err = run_cli(source, tmp_path / "out", "--task", "panoptic", "--overwrite", capsys=capsys)
    assert code == 0 and "max |Δlogit|" in out and "Loading weights" not in err  # --no-progress: not even this bar
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's 0700


def test_the_logit_check_does_not_let_a_nan_through(tmp_path):
    """Python's `max` would drop a NaN difference; NaN in the weights themselves: test_bad_inputs.py."""
    source = save_folder(tmp_path / "ckpt", original_state_dict(), original_config())
    convert_checkpoint(source, tmp_path / "out", task="panoptic", progress=False)
    model = AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "out").eval()
    pixels = verification_pixels(32)
    masks, classes = reference_forward(original_state_dict(), pixels, num_heads=2)
    classes[0, 0, 0] = float("nan")
    assert math.isnan(logit_difference(model, (masks, classes), pixels, IMAGENET_MEAN, IMAGENET_STD))


def test_no_verify_converts_a_mid_annealing_checkpoint(tmp_path, capsys):
    source = save_folder(tmp_path / "ckpt", original_state_dict(mask_probs=0.5), original_config())
    code, _, err = run_cli(source, tmp_path / "out", "--task", "panoptic", capsys=capsys)
    assert code == 1 and "--no-verify" in err
    code, out, _ = run_cli(source, tmp_path / "out", "--task", "panoptic", "--no-verify", capsys=capsys)
    assert code == 0 and "verification: skipped" in out


def test_module_entry_point_converts_a_real_small_backbone(tmp_path):
    """`python -m modeling_eomt.convert` end to end with the real ViT-S shapes (384 wide, 12 blocks, 6 heads)."""
    sd = original_state_dict(hidden_size=384, num_hidden_layers=12, num_blocks=3, num_labels=19, num_queries=10)
    source = save_folder(tmp_path / "ckpt", sd, original_config(num_blocks=3, num_labels=19, num_queries=10))
    command = [sys.executable, "-m", "modeling_eomt.convert", str(source), str(tmp_path / "out"), "--no-progress"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "task: semantic, labels: cityscapes_semantic" in completed.stdout
    assert_matches_reference(tmp_path / "out", sd, num_heads=6)
