"""The target architecture of a conversion: what the weights determine (width, depth, heads, queries, labels,
blocks), completed by the release's `config.json`, a DINOv3 base config, a preset and flags; contradictions named."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.utils import logging

from ..configuration import (
    DINOV3_SIZES,
    PRESETS,
    SIZES,
    TASKS,
    EomtBaseConfig,
    EomtConfig,
    EomtDinov3Config,
)
from ..configuration.labels import dataset_for, id2label
from ..configuration.presets import DATASETS, TIMM_BACKBONES
from .dinov3 import is_dinov3_checkpoint
from .errors import ConversionError
from .mapping import BACKBONE_PREFIX
from .reading import CONVERTED_MODEL_TYPES

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Target:
    """What to build: the config, the task (processor settings), and the label set / released result if known."""

    config: EomtBaseConfig
    task: str
    dataset: str | None  # key of DATASETS
    preset: str | None


def backbone_size(name: str) -> str:
    """Backbone size (small … giant) of a timm backbone name (a pretrained tag like `.lvd142m` is ignored)."""
    if name in SIZES:
        return name
    if "dinov3" in name.lower():
        raise ConversionError(
            f"--backbone {name} names a DINOv3 backbone, but --backbone is for the timm DINOv2 backbones of the "
            "release; a DINOv3 checkpoint takes its backbone from --base-backbone NAME_OR_PATH."
        )
    sizes = {timm_name: size for size, timm_name in TIMM_BACKBONES.items()}
    base = name.split(".")[0]
    if base not in sizes:
        raise ConversionError(
            f"Unknown backbone {name!r}; use one of {', '.join(TIMM_BACKBONES.values())} (or small/base/large/giant)."
        )
    return sizes[base]


def infer_architecture(original: dict[str, torch.Tensor]) -> dict:
    """The architecture fields an original state dict determines: width, depth, patch size, registers and MLP from
    the backbone's shapes (and, for DINOv2, the native size from the position embedding); queries, labels, masked
    blocks and upscale blocks from the head. Fields whose tensors are missing are left out."""
    dinov3 = is_dinov3_checkpoint(original)
    blocks = BACKBONE_PREFIX + "blocks."
    fields: dict = {}
    cls_token = original.get(BACKBONE_PREFIX + ("patch_embed.cls_token" if dinov3 else "cls_token"))
    if cls_token is not None:
        fields["hidden_size"] = cls_token.shape[-1]
    depth = {key.split(".")[4] for key in original if key.startswith(blocks)}
    if depth:
        fields["num_hidden_layers"] = len(depth)
    patch = original.get(
        BACKBONE_PREFIX + ("patch_embed.patch_embeddings.weight" if dinov3 else "patch_embed.proj.weight")
    )
    if patch is not None:
        fields["patch_size"] = patch.shape[-1]
    registers = original.get(BACKBONE_PREFIX + ("patch_embed.register_tokens" if dinov3 else "reg_token"))
    fields["num_register_tokens"] = 0 if registers is None else registers.shape[1]
    if dinov3:
        up = original.get(blocks + "0.mlp.up_proj.weight")
        if up is not None:
            fields["intermediate_size"] = up.shape[0]
        fields["use_gated_mlp"] = blocks + "0.mlp.gate_proj.weight" in original
        fields["mlp_bias"] = blocks + "0.mlp.up_proj.bias" in original
        for name, field in (("q", "query_bias"), ("k", "key_bias"), ("v", "value_bias"), ("o", "proj_bias")):
            fields[field] = f"{blocks}0.attention.{name}_proj.bias" in original
    else:
        fc1, fc2 = original.get(blocks + "0.mlp.fc1.weight"), original.get(blocks + "0.mlp.fc2.weight")
        if fc1 is not None and fc2 is not None:
            fields["use_swiglu_ffn"] = fc1.shape[0] == 2 * fc2.shape[1]  # timm packs SwiGLU's gate and up rows
            if not fields["use_swiglu_ffn"] and fc1.shape[0] % fc1.shape[1] == 0:
                fields["mlp_ratio"] = fc1.shape[0] // fc1.shape[1]
        pos_embed = original.get(BACKBONE_PREFIX + "pos_embed")
        if pos_embed is not None and patch is not None and math.isqrt(pos_embed.shape[-2]) ** 2 == pos_embed.shape[-2]:
            fields["image_size"] = math.isqrt(pos_embed.shape[-2]) * patch.shape[-1]
    if "network.q.weight" in original:
        fields["num_queries"] = original["network.q.weight"].shape[0]
    if "network.class_head.weight" in original:
        fields["num_labels"] = original["network.class_head.weight"].shape[0] - 1  # the last class is "no object"
    if "network.attn_mask_probs" in original:
        fields["num_blocks"] = original["network.attn_mask_probs"].numel()
    upscale = {key.split(".")[2] for key in original if key.startswith("network.upscale.")}
    if upscale:
        fields["num_upscale_blocks"] = len(upscale)
    return fields


# Architecture fields a Transformers-format config.json (`model_type` eomt / eomt_dinov3) contributes.
_ARCHITECTURE_FIELDS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "hidden_act", "layer_norm_eps", "layerscale_value", "num_register_tokens", "num_queries", "num_blocks",
    "num_upscale_blocks", "mlp_ratio", "use_swiglu_ffn", "intermediate_size", "rope_parameters", "query_bias",
    "key_bias", "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp", "pos_embed_shift", "pos_embed_jitter",
    "pos_embed_rescale",
)  # fmt: skip


def _config_json_fields(original_config: dict) -> dict:
    """Architecture fields of a source folder's config.json: a Transformers config, or the release's own (with the
    aliases of its training arguments)."""
    if original_config.get("model_type") in CONVERTED_MODEL_TYPES:
        fields = {key: original_config[key] for key in _ARCHITECTURE_FIELDS if key in original_config}
        if isinstance(original_config.get("id2label"), dict):
            fields["num_labels"] = len(original_config["id2label"])
    else:
        backbone = original_config.get("backbone", original_config.get("backbone_name"))
        fields = {
            **(SIZES[backbone_size(backbone)] if backbone else {}),
            "image_size": original_config.get("image_size", original_config.get("img_size")),
            "patch_size": original_config.get("patch_size"),
            "num_queries": original_config.get("num_queries", original_config.get("num_q")),
            "num_labels": original_config.get("num_labels", original_config.get("num_classes")),
            "num_blocks": original_config.get("num_blocks"),
        }
    rope_type = (fields.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":  # checked here: transformers' own validation of other types fails with a traceback
        raise ConversionError(
            f"The source's config.json sets RoPE type {rope_type!r}, but DINOv3 EoMT only has the 'default' RoPE; set "
            '`rope_parameters` to {"rope_type": "default", "rope_theta": 100.0} in config.json (or delete it).'
        )
    for name in ("image_size", "patch_size"):
        value = fields.get(name)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConversionError(f"Only square `{name}` is supported, the original config has {value}.")
            fields[name] = value[0]
    return fields


def _base_config_fields(base_config) -> dict:
    """Our config fields that a transformers `DINOv3ViTConfig` determines."""
    fields = {
        name: getattr(base_config, name)
        for name in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "layer_norm_eps", "num_channels", "num_register_tokens", "layerscale_value", "query_bias", "key_bias",
            "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp", "pos_embed_shift", "pos_embed_jitter",
            "pos_embed_rescale",
        )
    }  # fmt: skip
    patch_size = base_config.patch_size
    fields["patch_size"] = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    fields["rope_parameters"] = {"rope_theta": float(base_config.rope_theta), "rope_type": "default"}
    if fields["hidden_act"] != "gelu":
        # Our config (like the built-in's) has one activation for the backbone's MLP and the head, whose release
        # always uses GELU: a checkpoint with another MLP activation cannot be represented (none was released).
        raise ConversionError(
            f"The base backbone's MLP uses {fields['hidden_act']!r}, but EoMT-DINOv3's `hidden_act` also drives the "
            "mask head and upscale blocks, which the release runs with GELU; only DINOv3 backbones with a GELU MLP "
            "(ViT-S/B/L) convert."
        )
    return fields


def resolve_target(
    original: dict[str, torch.Tensor],
    original_config: dict | None = None,
    preset: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    num_queries: int | None = None,
    num_labels: int | None = None,
    num_blocks: int | None = None,
    task: str | None = None,
    base_config=None,
) -> Target:
    """The architecture: what the weights determine (`infer_architecture`), then, in increasing priority, the base
    backbone's config (DINOv3), the preset, the source's `config.json`, `--backbone` and the size flags. These
    fill in what the weights leave open (the native size of a DINOv3 checkpoint, the head count); one that
    contradicts the weights is an error naming both."""
    dinov3 = is_dinov3_checkpoint(original)
    inferred = infer_architecture(original)
    config_class = EomtDinov3Config if dinov3 else EomtConfig
    width = inferred.get("hidden_size")
    sizes = DINOV3_SIZES if dinov3 else SIZES
    # Heads are invisible in the tensors: the released size of this width, else DINO's head size of 64.
    heads = next((spec["num_attention_heads"] for spec in sizes.values() if spec["hidden_size"] == width), None)
    layers: list[tuple[str | None, dict]] = [("the head count", {"num_attention_heads": heads or (width or 64) // 64})]
    if base_config is not None:
        layers.append(("the base backbone's config", _base_config_fields(base_config)))
    dataset = None
    if preset is not None:
        if preset not in PRESETS:
            raise ConversionError(f"Unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}.")
        spec = PRESETS[preset]
        if (spec.backbone == "dinov3") != dinov3:
            raise ConversionError(
                f"Preset {preset!r} is a {spec.backbone.upper()} checkpoint, but the source has "
                f"{'DINOv3' if dinov3 else 'DINOv2'} weight names; pick a {'DINOv3' if dinov3 else 'DINOv2'} preset "
                "or drop --preset."
            )
        layers.append((f"preset {preset!r}", spec.config_kwargs()))
        dataset = spec.labels
    layers.append(("the source's config.json", _config_json_fields(original_config or {})))
    if backbone is not None:
        layers.append((f"--backbone {backbone}", SIZES[backbone_size(backbone)]))
    flags = {"image_size": image_size, "num_queries": num_queries, "num_labels": num_labels, "num_blocks": num_blocks}
    layers.append((None, flags))  # None: the flag of each field

    merged = dict(inferred)
    for source, fields in layers:
        for field, value in fields.items():
            if value is None:
                continue
            if field in inferred and value != inferred[field]:
                source = source or f"--{field.replace('_', '-')} {value}"
                raise ConversionError(
                    f"{source} sets {field}={value!r}, but the checkpoint's weights have {field}={inferred[field]!r}; "
                    "drop or correct it (the weights decide)."
                )
            if field == "num_labels" or hasattr(config_class, field):  # a preset's fields of the other family
                merged[field] = value
    if "hidden_size" not in merged:
        raise ConversionError(
            "Cannot tell the backbone of the checkpoint (it has no CLS token); pass --preset NAME or --backbone NAME."
        )
    if "image_size" not in merged:
        why = " (its rotary position embedding has no trained size)" if dinov3 else ""
        raise ConversionError(f"Cannot tell `image_size` of the checkpoint{why}; pass --preset NAME or --image-size.")
    try:
        config = config_class(**merged)
    except (TypeError, ValueError, KeyError, AttributeError) as error:  # transformers' own checks raise all four
        raise ConversionError(f"Inconsistent architecture: {error}") from error
    return _with_task(config, task, dataset, preset)


def _with_task(config: EomtBaseConfig, task: str | None, dataset: str | None, preset: str | None) -> Target:
    """The target for `config`: the task (given, the preset's, or told by the label count) and its label names."""
    if dataset is not None and DATASETS[dataset]["num_labels"] != config.num_labels:
        dataset = None  # the label count was overridden: the preset's names no longer apply
    if task is None:
        task = DATASETS[dataset]["task"] if dataset else None
    if task is None:
        candidates = [key for key, spec in DATASETS.items() if spec["num_labels"] == config.num_labels]
        if len(candidates) != 1:
            raise ConversionError(
                f"Cannot tell the task of a checkpoint with {config.num_labels} labels; pass --task {'|'.join(TASKS)}."
            )
        task = DATASETS[candidates[0]]["task"]
    if task not in TASKS:
        raise ConversionError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if dataset is None or DATASETS[dataset]["task"] != task:
        dataset = dataset_for(task, config.num_labels)
    if dataset is not None:
        config.id2label = id2label(dataset)
        config.label2id = {name: index for index, name in config.id2label.items()}
    return Target(config, task, dataset, preset)
