"""Conversion of EoMT checkpoints of the original release (PyTorch Lightning + timm or transformers' DINOv3) to this
package's Hub format.

Pipeline: read the source without unpickling code → (DINOv3) add the base backbone to the stored deltas → read the
architecture off the weights (the base config, preset, original `config.json` and flags fill in the rest) → map
every tensor to its new name, as views → run the independent reference forward on the original tensors → write
the shards into a temporary folder → reload them with our model and compare logits → add the processor config and
model card → rename the folder into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.utils import logging

from ..configuration import (
    DINOV3_SIZES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    SIZES,
    TASKS,
    EomtBaseConfig,
    EomtConfig,
    EomtDinov3Config,
)
from ..configuration.labels import dataset_for, id2label
from ..configuration.presets import DATASETS, TIMM_BACKBONES
from ..image_processing import EomtImageProcessor
from ..model_card import build_model_card
from ..timm_names import TIMM_DINOV2_MLP_NAMES, TIMM_DINOV2_NAMES, name_pattern
from ..umask import apply_umask
from .dinov3 import absolute_attn_mask_probs, is_dinov3_checkpoint, load_base_backbone, merge_deltas
from .errors import ConversionError
from .reference import reference_forward

logger = logging.get_logger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The check runs in float64 by default: float32 rounding alone moves EoMT-L logits by ~1e-4 (measured on random
# weights), so only float64 makes the tolerance a statement about the conversion rather than about the arithmetic.
VERIFY_DTYPES = {"float64": torch.float64, "float32": torch.float32}
MAX_SHARD_SIZE = "2GB"
# Tolerance of the logit check per verification dtype: float32 allows for its own rounding.
DEFAULT_ATOL = {"float64": 1e-4, "float32": 1e-3}
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")
# Weight files of a checkpoint folder, in order of preference.
FOLDER_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# The original release's weight files; its Hub repos hold them beside a converted copy (model.safetensors).
ORIGINAL_WEIGHTS = ("pytorch_model.bin.index.json", "pytorch_model.bin")
# `model_type`s of configs in the Transformers format (a release's Hub folder holds one beside the original weights).
CONVERTED_MODEL_TYPES = ("eomt", "eomt_dinov3")


# ----------------------------------------------------------------------------------------------------------- mapping
# Original name → our name(s). `{n}` is a block/layer index, `{p}` weight or bias. Several targets split the tensor
# into equal chunks along dim 0 (timm's fused qkv rows are q|k|v; packed SwiGLU fc1 rows are gate|up).
_BACKBONE = "network.encoder.backbone."
# The release's DINOv2 backbone is timm's ViT.
_DINOV2_RULES = {
    swiglu: [(_BACKBONE + source, targets) for source, targets in TIMM_DINOV2_NAMES + TIMM_DINOV2_MLP_NAMES[swiglu]]
    for swiglu in (False, True)
}
# The release's DINOv3 backbone is transformers' DINOv3ViTModel with `embeddings` → `patch_embed`, `layer` → `blocks`.
_DINOV3_RULES: list[tuple[str, tuple[str, ...] | None]] = [
    (_BACKBONE + "patch_embed.cls_token", ("embeddings.cls_token",)),
    (_BACKBONE + "patch_embed.register_tokens", ("embeddings.register_tokens",)),
    (_BACKBONE + "patch_embed.patch_embeddings.{p}", ("embeddings.patch_embeddings.{p}",)),
    *(
        (_BACKBONE + f"blocks.{{n}}.{module}.{{p}}", (f"layers.{{n}}.{module}.{{p}}",))
        for module in (
            *(f"attention.{x}_proj" for x in "qkvo"),
            *(f"mlp.{x}_proj" for x in ("gate", "up", "down")),
        )
    ),
    (_BACKBONE + "blocks.{n}.layer_scale1.lambda1", ("layers.{n}.layer_scale1.lambda1",)),
    (_BACKBONE + "blocks.{n}.layer_scale2.lambda1", ("layers.{n}.layer_scale2.lambda1",)),
    (_BACKBONE + "blocks.{n}.norm1.{p}", ("layers.{n}.norm1.{p}",)),
    (_BACKBONE + "blocks.{n}.norm2.{p}", ("layers.{n}.norm2.{p}",)),
    (_BACKBONE + "norm.{p}", ("layernorm.{p}",)),
]
_SHARED_RULES: list[tuple[str, tuple[str, ...] | None]] = [
    ("network.q.weight", ("query.weight",)),
    ("network.class_head.{p}", ("class_predictor.{p}",)),
    ("network.mask_head.0.{p}", ("mask_head.fc1.{p}",)),
    ("network.mask_head.2.{p}", ("mask_head.fc2.{p}",)),
    ("network.mask_head.4.{p}", ("mask_head.fc3.{p}",)),
    ("network.upscale.{n}.conv1.{p}", ("upscale_block.block.{n}.conv1.{p}",)),
    ("network.upscale.{n}.conv2.weight", ("upscale_block.block.{n}.conv2.weight",)),
    ("network.upscale.{n}.norm.{p}", ("upscale_block.block.{n}.layernorm2d.{p}",)),
    ("network.attn_mask_probs", ("attn_mask_probs",)),
    # Normalisation moves to the processor; the loss weights are rebuilt from the config.
    ("network.encoder.pixel_mean", None),
    ("network.encoder.pixel_std", None),
    ("criterion.empty_weight", None),
]
# Buffers of our model that the original does not store: rebuilt from the config.
DERIVED_KEYS = ("criterion.empty_weight",)


@dataclass(frozen=True)
class _Rule:
    source: str
    targets: tuple[str, ...] | None

    def match_source(self, key: str) -> dict[str, str] | None:
        match = name_pattern(self.source).match(key)
        return match.groupdict() if match else None

    def match_target(self, key: str) -> dict[str, str] | None:
        for target in self.targets or ():
            match = name_pattern(target).match(key)
            if match:
                return match.groupdict()
        return None


def mapping_rules(config: EomtBaseConfig) -> list[_Rule]:
    """The name rules for the backbone family (and MLP) of `config`."""
    if config.uses_rope:
        family = _DINOV3_RULES
    else:
        family = _DINOV2_RULES[config.use_swiglu_ffn]
    return [_Rule(source, targets) for source, targets in family + _SHARED_RULES]


def map_state_dict(original: dict[str, torch.Tensor], config: EomtConfig) -> dict[str, torch.Tensor]:
    """Our state dict (as views of the original tensors, no copies) from an original one.

    Raises `ConversionError` naming the first key without a rule, a missing key, or a shape that does not fit
    `config`.
    """
    rules = mapping_rules(config)
    expected = _expected_shapes(config)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in original.items():
        for rule in rules:
            groups = rule.match_source(key)
            if groups is None:
                continue
            if rule.targets is not None:
                names = [target.format(**groups) for target in rule.targets]
                chunks = tensor.chunk(len(names), dim=0) if len(names) > 1 else (tensor,)
                for name, chunk in zip(names, chunks):
                    converted[name] = _fit_shape(key, name, chunk, expected, config)
            break
        else:
            raise ConversionError(
                f"Key {key!r} of the checkpoint has no counterpart in EoMT ({_describe(config)}); the file holds "
                "another model or a modified EoMT. Convert an unmodified checkpoint of the original release."
            )
    for name in expected:
        if name not in converted and name not in DERIVED_KEYS:
            raise ConversionError(
                f"The checkpoint lacks {_original_name(name, rules)!r} (needed for {name!r} of {_describe(config)}); "
                "check --preset/--backbone and the size flags, or that the file is complete."
            )
    return converted


def _fit_shape(
    key: str, name: str, tensor: torch.Tensor, expected: dict[str, torch.Size], config: EomtConfig
) -> torch.Tensor:
    shape = expected.get(name)
    if shape is None:  # e.g. block 30 of a 24-block backbone
        raise ConversionError(
            f"Key {key!r} does not fit {_describe(config)} (no {name!r}); pick the preset or --backbone that matches "
            "the checkpoint."
        )
    if tensor.shape != shape and tensor.shape[0] == 1 and tensor.shape[1:] == shape:
        tensor = tensor[0]  # timm keeps a batch axis on pos_embed
    if tensor.shape != shape:
        raise ConversionError(
            f"Tensor {key!r} has shape {tuple(tensor.shape)} but {_describe(config)} expects {tuple(shape)} for "
            f"{name!r}; pick the preset or --backbone/--image-size/--num-queries/--num-labels that match the "
            "checkpoint."
        )
    return tensor


def model_class(config: EomtBaseConfig) -> type:
    """Our model class for `config`'s backbone family."""
    from ..modeling import EomtDinov3ForUniversalSegmentation, EomtForUniversalSegmentation

    return EomtDinov3ForUniversalSegmentation if config.uses_rope else EomtForUniversalSegmentation


def _expected_shapes(config: EomtBaseConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = model_class(config)(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _original_name(name: str, rules: list[_Rule]) -> str:
    for rule in rules:
        groups = rule.match_target(name)
        if groups is not None:
            return rule.source.format(**groups)
    return name


def _describe(config: EomtBaseConfig) -> str:
    sizes = DINOV3_SIZES if config.uses_rope else SIZES
    size = next((s for s, spec in sizes.items() if spec["hidden_size"] == config.hidden_size), "custom")
    return (
        f"EoMT-{size}{' (DINOv3)' if config.uses_rope else ''} (image_size={config.image_size}, num_queries={config.num_queries}, "
        f"num_labels={config.num_labels}, num_blocks={config.num_blocks})"
    )


# ------------------------------------------------------------------------------------------------------ reading input
def resolve_source(source: str | os.PathLike) -> Path:
    """A local path for `source`; Hub repo ids (`org/name`) are downloaded when a network is available."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.endswith(CHECKPOINT_SUFFIXES):
        from huggingface_hub import snapshot_download

        try:
            # The release's repos also hold a converted copy (model.safetensors): download safetensors only when
            # nothing else could be the checkpoint.
            folder = Path(snapshot_download(text, allow_patterns=["*.json", "*.bin", "*.pt", "*.pth", "*.ckpt"]))
            has_checkpoint = any(p.suffix in CHECKPOINT_SUFFIXES for p in folder.iterdir())
            if not has_checkpoint and _folder_config(folder).get("model_type") not in CONVERTED_MODEL_TYPES:
                folder = Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))
            return folder
        except Exception as error:  # offline, unknown repo, gated, …
            raise ConversionError(
                f"{text!r} is no local path and could not be downloaded from the Hub ({type(error).__name__}); "
                "check the repo id and the network, or download the checkpoint and pass its folder."
            ) from error
    raise ConversionError(
        f"{text} does not exist; pass a checkpoint folder (pytorch_model.bin + config.json), a checkpoint file "
        f"({', '.join(CHECKPOINT_SUFFIXES)}) or a Hub repo id such as tue-mps/coco_panoptic_eomt_large_640."
    )


def load_original(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The original state dict (wrappers and `_orig_mod` removed) and the folder's original `config.json` (or {})."""
    original_config: dict = {}
    if path.is_dir():
        original_config, candidates = _folder_config(path), FOLDER_WEIGHTS
        converted = original_config.get("model_type") in CONVERTED_MODEL_TYPES
        if converted:  # a Transformers config, maybe beside the original weights: those are converted, if present
            candidates = ORIGINAL_WEIGHTS
        weights = next((path / name for name in candidates if (path / name).is_file()), None)
        if weights is None and converted:
            raise ConversionError(
                f"{path} is already in the Transformers format (model_type {original_config['model_type']!r}); load it with "
                "`from_pretrained` instead of converting it."
            )
        if weights is None:
            raise ConversionError(
                f"{path} holds no weights ({', '.join(FOLDER_WEIGHTS)}); pass the folder of a downloaded checkpoint "
                "or the checkpoint file itself."
            )
        path = weights
    if path.name.endswith(".index.json"):
        index = _read_json(path)
        if not isinstance(index.get("weight_map"), dict):
            raise ConversionError(f"{path} has no `weight_map`; re-download the checkpoint's index file.")
        shard_names = sorted(set(index["weight_map"].values()))
        state_dict: dict = {}
        for shard_name in shard_names:
            state_dict.update(_load_file(path.parent / shard_name))
    else:
        state_dict = _load_file(path)
    return _clean_names(state_dict, path), original_config


def _folder_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    return _read_json(config_file) if config_file.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(
            f"{path} is not valid JSON ({error}); repair or re-download it, or delete it."
        ) from error
    if not isinstance(content, dict):
        raise ConversionError(
            f"{path} holds a JSON {type(content).__name__}, not an object; repair or re-download it."
        )
    return content


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; the checkpoint is incomplete (missing shard?).")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # safetensors' own error type for truncated or damaged headers and data
            raise ConversionError(
                f"{path} is not a readable safetensors file ({error}); it is truncated or damaged: re-download it."
            ) from error
    with path.open("rb") as file:
        magic = file.read(4)
    # torch.save writes a zip archive (or, in its legacy format, a pickle, whose first byte is the PROTO opcode).
    if not magic.startswith((b"PK\x03\x04", b"\x80")):
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint (it starts with {magic!r}, neither a zip archive nor a pickle); pass "
            "the checkpoint file itself (re-download it if it was cut short)."
        )
    try:
        try:  # memory-mapped: tensors are read from disk on use, so the weights are never held twice
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():  # a damaged pickle, not a refused object
            raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({error}); re-download it.") from error
        raise ConversionError(
            f"{path} contains Python objects besides tensors, which are never unpickled here; load it in a trusted "
            "session and save only its state dict (`torch.save(checkpoint['state_dict'], 'weights.bin')`)."
        ) from error
    except Exception as error:  # torch.load fails on damaged files with KeyError, EOFError, RuntimeError, …
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({error!r}); re-download it.") from error


def _clean_names(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # Lightning .ckpt
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ConversionError(
            f"{path} holds no state dict (name → tensor); pass a checkpoint of the original EoMT release."
        )
    # torch.compile wraps modules as `_orig_mod`, which shows up anywhere in the names.
    state_dict = {key.replace("_orig_mod.", ""): tensor for key, tensor in checkpoint.items()}
    if not any(key.startswith("network.") for key in state_dict):
        if any(key.startswith(("layers.", "embeddings.")) for key in state_dict):
            hint = "it is already in the Transformers format; load it with `from_pretrained` instead"
        else:
            hint = "pass a checkpoint of the original EoMT release (tue-mps/eomt)"
        example = next(iter(state_dict), "<empty>")
        raise ConversionError(
            f"{path} is not an original EoMT checkpoint: none of its {len(state_dict)} keys start with 'network.' "
            f"(e.g. {example!r}); {hint}."
        )
    return state_dict


# ------------------------------------------------------------------------------------------------------- architecture
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
    blocks = _BACKBONE + "blocks."
    fields: dict = {}
    cls_token = original.get(_BACKBONE + ("patch_embed.cls_token" if dinov3 else "cls_token"))
    if cls_token is not None:
        fields["hidden_size"] = cls_token.shape[-1]
    depth = {key.split(".")[4] for key in original if key.startswith(blocks)}
    if depth:
        fields["num_hidden_layers"] = len(depth)
    patch = original.get(_BACKBONE + ("patch_embed.patch_embeddings.weight" if dinov3 else "patch_embed.proj.weight"))
    if patch is not None:
        fields["patch_size"] = patch.shape[-1]
    registers = original.get(_BACKBONE + ("patch_embed.register_tokens" if dinov3 else "reg_token"))
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
        pos_embed = original.get(_BACKBONE + "pos_embed")
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


# ------------------------------------------------------------------------------------------------------------ writing
def write_weights(
    tensors: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype, progress: bool = True
) -> None:
    """Safetensors shards (with an index when there are several), one shard in memory at a time."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD_SIZE)
    with tqdm(total=len(tensors), desc="Writing tensors", unit="tensor", disable=not progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard, storages = {}, set()
            for name in names:
                tensor = tensors[name]
                storage = tensor.untyped_storage().data_ptr()
                # Chunks of one fused tensor share its storage, which safetensors refuses: copy all but the first.
                if tensor.dtype != dtype or storage in storages or not tensor.is_contiguous():
                    tensor = tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
                else:
                    storages.add(storage)
                shard[name] = tensor
            save_file(shard, directory / filename, metadata={"format": "pt"})
            del shard
            bar.update(len(names))
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------- verification
def verification_pixels(image_size: int) -> torch.Tensor:
    """The fixed input of the check: one image of uniform noise in [0, 1] at the native size."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, image_size, image_size, generator=generator)


def logit_difference(
    model: torch.nn.Module, reference: tuple[torch.Tensor, torch.Tensor], pixels: torch.Tensor, mean, std
) -> float:
    """Max abs difference between our model (on normalised pixels, in the model's dtype) and the reference logits."""
    dtype = next(model.parameters()).dtype
    normalised = (pixels.to(dtype) - torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=dtype
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        output = model(pixel_values=normalised)
    ref_masks, ref_classes = reference
    differences = torch.stack(
        [
            (output.masks_queries_logits.double() - ref_masks.double()).abs().max(),
            (output.class_queries_logits.double() - ref_classes.double()).abs().max(),
        ]
    )
    return differences.max().item()  # torch's max, unlike Python's, keeps a NaN


# ----------------------------------------------------------------------------------------------------------- command
@dataclass
class ConversionResult:
    output_dir: Path
    config: EomtBaseConfig
    task: str
    dataset: str | None
    num_parameters: int
    dtype: str
    max_abs_difference: float | None  # None when verification was skipped
    seconds: float


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    preset: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    num_queries: int | None = None,
    num_labels: int | None = None,
    num_blocks: int | None = None,
    task: str | None = None,
    base_backbone: str | os.PathLike | None = None,
    attn_mask_probs: str | None = None,
    dtype: str = "float32",
    verify: bool = True,
    verify_dtype: str = "float64",
    atol: float | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert an original EoMT checkpoint into a folder loadable with `from_pretrained` and the pipeline.

    Everything is written to a temporary sibling of `output_dir`, which replaces it only once all files exist and,
    with `verify`, the converted model reproduces the reference logits within `atol` (both computed in
    `verify_dtype`, on the weights as written in `dtype`; default `DEFAULT_ATOL[verify_dtype]`). Raises
    `ConversionError` on bad input (nothing is written then).

    A DINOv3 checkpoint stores its backbone as deltas against `base_backbone` (a Hub id or a local folder in
    transformers' DINOv3 format; a DINOv3 preset supplies its Hub id); `attn_mask_probs` ("raw" or "delta") says
    how it stores its masking probabilities when their values cannot tell.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir).expanduser()
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if verify_dtype not in VERIFY_DTYPES:
        raise ConversionError(
            f"Unknown verification dtype {verify_dtype!r}; choose one of {', '.join(VERIFY_DTYPES)}."
        )
    atol = DEFAULT_ATOL[verify_dtype] if atol is None else atol
    if not atol > 0:  # also NaN, which no difference could exceed
        raise ConversionError(f"--atol must be a positive tolerance, got {atol}.")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"{output_dir} is a file; pass a folder path as OUTPUT_DIR.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{output_dir} exists and is not empty; pass --overwrite to replace it.")

    source_path = resolve_source(source)
    if output_dir.resolve() in (source_path.resolve(), *source_path.resolve().parents):
        raise ConversionError(
            f"OUTPUT_DIR {output_dir} holds the source {source_path}, which replacing it would delete; pick another "
            "folder."
        )
    if preset is None and _name(source) in PRESETS:
        preset = _name(source)
        logger.info(f"Using preset {preset!r} (from the source name).")
    original, original_config = load_original(source_path)
    _check_finite(original)
    base_config = None
    if is_dinov3_checkpoint(original):
        if backbone is not None:
            raise ConversionError(
                f"{source} is a DINOv3 checkpoint; --backbone is for DINOv2 ones: pass --base-backbone instead."
            )
        if base_backbone is None and preset in PRESETS and PRESETS[preset].backbone == "dinov3":
            base_backbone = PRESETS[preset].base_backbone
        if base_backbone is None:
            raise ConversionError(
                f"{source} is a DINOv3 EoMT checkpoint, which stores its backbone as deltas against the DINOv3 "
                "weights it was trained from; pass --base-backbone NAME_OR_PATH (a Hub id such as "
                "facebook/dinov3-vitl16-pretrain-lvd1689m or a local folder in transformers' DINOv3 format) or the "
                "--preset of a released DINOv3 checkpoint."
            )
        with contextlib.nullcontext() if progress else _without_progress_bars():
            base, base_config = load_base_backbone(base_backbone)
        original = merge_deltas(original, base, base_config, base_backbone)
        del base
    elif base_backbone is not None:
        raise ConversionError(
            f"{source} is a DINOv2 checkpoint (timm names), which stores absolute weights; drop --base-backbone."
        )
    elif attn_mask_probs is None:
        attn_mask_probs = "raw"  # only the DINOv3 checkpoints store deltas
    if "network.attn_mask_probs" in original:
        original["network.attn_mask_probs"] = absolute_attn_mask_probs(
            original["network.attn_mask_probs"], attn_mask_probs
        )
    target = resolve_target(
        original, original_config, preset, backbone, image_size, num_queries, num_labels, num_blocks, task, base_config
    )
    config = target.config
    converted = map_state_dict(original, config)
    converted["criterion.empty_weight"] = _empty_weight(config)
    mean = _statistic(original, "network.encoder.pixel_mean", IMAGENET_MEAN)
    std = _statistic(original, "network.encoder.pixel_std", IMAGENET_STD)

    reference = pixels = None
    if verify:
        pixels = verification_pixels(config.image_size)
        try:
            reference = reference_forward(
                original,
                pixels,
                config.num_attention_heads,
                DTYPES[dtype],
                VERIFY_DTYPES[verify_dtype],
                config.layer_norm_eps,
                getattr(config, "rope_theta", 100.0),
                config.mlp_activation,
            )
        except ValueError as error:
            raise ConversionError(f"Cannot verify: {error} Pass --no-verify to convert without the check.") from error

    created = _first_missing(output_dir.parent)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output_dir)
    # Not mkdtemp, whose folders are private (0700): the result is an ordinary folder, with the umask's permissions.
    # The name holds our process id, so a later run can tell the leftovers of a killed run from a running one's.
    staging = output_dir.parent / f".{output_dir.name}.{os.getpid()}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        config.architectures = [model_class(config).__name__]
        config.dtype = DTYPES[dtype]
        config.save_pretrained(staging)
        write_weights(converted, staging, DTYPES[dtype], progress)
        num_parameters = sum(
            t.numel() for name, t in converted.items() if name not in DERIVED_KEYS + ("attn_mask_probs",)
        )
        del converted, original  # the reload below is the only copy of the weights from here on

        difference = None
        if verify:
            with contextlib.nullcontext() if progress else _without_progress_bars():
                difference = _verify(staging, config, VERIFY_DTYPES[verify_dtype], reference, pixels, mean, std)
            if not difference <= atol:
                hint = " (or float32 rounding: check with --verify-dtype float64)" if verify_dtype != "float64" else ""
                raise ConversionError(
                    f"Verification failed: converted logits differ from the reference by {difference:.3g} "
                    f"(> {atol:g}); the checkpoint does not match {_describe(config)} or the mapping is wrong{hint}."
                )

        processor = EomtImageProcessor.for_task(
            target.task, config.image_size, mean, std, do_reduce_labels=target.dataset == "ade20k_semantic"
        )
        if target.task == "semantic" and config.uses_rope:
            # The DINOv3 release evaluates semantic segmentation like panoptic: long side scaled, padded to a square.
            processor.size = {"shortest_edge": config.image_size, "longest_edge": config.image_size}
            processor.do_split_image, processor.do_pad = False, True
        processor.save_pretrained(staging)
        metrics = None
        if target.preset is not None and _is_preset(config, target):
            metrics = {PRESETS[target.preset].metric: PRESETS[target.preset].result}
        card = build_model_card(
            config,
            task=target.task,
            dataset=target.dataset,
            metrics=metrics,
            model_name=target.preset or output_dir.name,
            repo_id=push_to_hub,
            notes=_provenance(source, difference, atol, base_backbone),
        )
        (staging / "README.md").write_text(card)

        apply_umask(staging)
        _replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise

    if push_to_hub:
        from huggingface_hub import HfApi

        try:
            api = HfApi()
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=output_dir, commit_message=f"Convert {source}")
        except Exception as error:  # network, authentication, permissions, …
            raise ConversionError(
                f"{output_dir} is complete, but uploading it to {push_to_hub} failed ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); log in with `hf auth login` "
                f"and upload the folder with `hf upload {push_to_hub} {output_dir}`."
            ) from error
    return ConversionResult(
        output_dir, config, target.task, target.dataset, num_parameters, dtype, difference, time.perf_counter() - start
    )


def _verify(
    directory: Path, config: EomtBaseConfig, dtype: torch.dtype, reference, pixels: torch.Tensor, mean, std
) -> float:
    model = model_class(config).from_pretrained(directory, dtype=dtype).eval()
    return logit_difference(model, reference, pixels, mean, std)


def _check_finite(original: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite weights, which no check of logits could vouch for."""
    for key, tensor in original.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise ConversionError(
                f"Tensor {key!r} holds {count} NaN or infinite values: the checkpoint is damaged (or training "
                "diverged); convert an earlier or re-downloaded checkpoint."
            )


def _provenance(
    source: str | os.PathLike, difference: float | None, atol: float, base_backbone: str | os.PathLike | None
) -> str:
    text = f"Converted from the original checkpoint `{source}` with `eomt-convert`"
    if difference is None:
        text += " (logits not verified)."
    else:
        text += f"; its logits match a reference forward of the original weights to {difference:.1e} (≤ {atol:g})."
    if base_backbone is not None:
        text += (
            f" The backbone is the DINOv3 backbone `{base_backbone}` plus the checkpoint's deltas, so its weights "
            "also fall under the DINOv3 licence of that backbone."
        )
    return text


def _is_preset(config: EomtConfig, target: Target) -> bool:
    """Whether the converted model is exactly the released one (so the released result applies to it)."""
    spec = PRESETS[target.preset]
    fields = spec.config_kwargs()
    return target.dataset == spec.labels and all(getattr(config, key) == value for key, value in fields.items())


def _empty_weight(config: EomtConfig) -> torch.Tensor:
    from ..loss import EomtLoss

    return EomtLoss(config).empty_weight


def _statistic(original: dict[str, torch.Tensor], key: str, default: tuple[float, ...]) -> list[float]:
    if key not in original:
        return list(default)
    return [round(value, 6) for value in original[key].flatten().tolist()]


def _name(source: str | os.PathLike) -> str:
    """Name of a source without checkpoint suffix: folder, file stem or Hub repo name (may be a preset name; the
    DINOv3 ADE20K release is also published as `ade_semantic_…`)."""
    path = Path(str(source).rstrip("/"))
    name = path.stem if path.suffix in CHECKPOINT_SUFFIXES else path.name
    return "ade20k_" + name.removeprefix("ade_") if name.startswith("ade_") else name


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` in `target`'s place. An existing `target` is moved aside first and deleted only once `new`
    is in place (and moved back if that fails), so a failure never loses both."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced.", dir=target.parent))
    os.replace(target, aside)  # onto the empty folder mkdtemp made
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as error:
        logger.warning(f"The new folder is in place, but the replaced one, {aside}, could not be deleted: {error}")


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """transformers' progress bars (e.g. "Loading weights") off for the block."""
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _remove_stale_staging(output_dir: Path) -> None:
    """Delete staging folders for `output_dir` left by conversions that were killed (their process is gone)."""
    if os.name != "posix" or not output_dir.parent.is_dir():  # liveness is checked with POSIX signal 0
        return
    pattern = re.compile(rf"\.{re.escape(output_dir.name)}\.(\d+)\.[0-9a-f]{{32}}")
    for candidate in output_dir.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match is None or not candidate.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # a conversion still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):  # alive under another user, or no valid pid at all
            continue
        logger.warning(f"Removing {candidate}, the staging folder of an interrupted conversion.")
        shutil.rmtree(candidate, ignore_errors=True)


def _first_missing(path: Path) -> Path | None:
    """The outermost ancestor of `path` (inclusive) that does not exist yet, to undo creating it on failure."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing
