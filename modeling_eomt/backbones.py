"""A fresh EoMT whose ViT trunk starts from a pretrained DINOv2 or DINOv3 backbone (`EomtForUniversalSegmentation.
from_backbone`); queries and heads keep their random initialisation, as in the paper's recipe.

Reading order: `find_backbone` names the source (a transformers folder or Hub id, or a timm-format DINOv2 state dict)
and the EoMT config fields its architecture fixes → `from_backbone` merges the caller's fields and builds the config,
which checks them before any weight is read → `Backbone.read_weights` gives the trunk under EoMT's names at the
backbone's own patch size → `fit_weights` resamples the patch kernel and the position grid to the EoMT's patch size
and grid, numerically as timm's loader does for the original release → a fresh EoMT loads them.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file, logging

from .configuration import SIZES, EomtDinov3Config
from .modeling import EomtDinov3ForUniversalSegmentation
from .positions import resize_position_grid
from .timm_names import TIMM_DINOV2_MLP_NAMES, TIMM_DINOV2_NAMES, name_pattern

logger = logging.get_logger(__name__)

DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
DINOV3_MODEL_TYPE = "dinov3_vit"
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
# How both formats of the release name a timm checkpoint's weight file, in order of preference.
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# What the paper's recipe starts from, as examples for error messages.
EXAMPLES = (
    "facebook/dinov2-with-registers-large, facebook/dinov3-vitl16-pretrain-lvd1689m, or a timm "
    "vit_large_patch14_reg4_dinov2 state dict (.safetensors / .pth)"
)
# Parameters and buffers outside the ViT trunk: they start fresh.
HEAD_PREFIXES = ("query.", "class_predictor.", "mask_head.", "upscale_block.", "criterion.", "attn_mask_probs")
# Number of query blocks of the paper per backbone width, DINOv2 and DINOv3 alike (S, B: 3; L: 4; g: 5; 7B: 5).
PAPER_NUM_BLOCKS = {size["hidden_size"]: size["num_blocks"] for size in SIZES.values()} | {4096: 5}
# DINOv2 heads are 64 wide at every size, which the state dicts cannot tell.
DINOV2_HEADS = {size["hidden_size"]: size["num_attention_heads"] for size in SIZES.values()}
# Backbone fields a caller may change: initial values and training-time augmentations. The others describe what the
# pretrained weights compute (shapes, activation, norms, positions) and cannot be overridden.
TUNABLE_FIELDS = ("layerscale_value", "pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")


class BackboneError(ValueError):
    """A backbone `from_backbone` cannot start from; the message names the problem and the fix."""


@dataclass(frozen=True)
class Family:
    """An EoMT variant that a kind of backbone starts: where its patch kernel and position table live."""

    name: str
    kernel_key: str
    position_key: str | None  # DINOv3 has rotary positions only


DINOV2 = Family("dinov2", "embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings.weight")
DINOV3 = Family("dinov3", "embeddings.patch_embeddings.weight", None)


@dataclass(frozen=True)
class Backbone:
    """A pretrained backbone, found but not read: its family, the EoMT fields it fixes, and how to read it."""

    name: str
    family: Family
    fields: dict[str, Any]
    read_weights: Callable[[], dict[str, torch.Tensor]]  # EoMT names, the backbone's own patch size and grid


# ---------------------------------------------------------------------------------------------------------- resampling
def resample_patch_kernel(kernel: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch-embedding kernel `(D, C, p, p)` resampled to `patch_size` (FlexiViT, as timm's `resample_patch_embed`).

    With `R` the bicubic antialiased resize of a patch from `p` to `patch_size` (a linear map), the new kernel is
    `pinv(Rᵀ)` applied to the old one: a resized patch meets it with the response the original patch had with the old
    kernel (exactly when enlarging, in least squares when shrinking).
    """
    old = kernel.shape[-2:]
    if tuple(old) == (patch_size, patch_size):
        return kernel
    basis = torch.eye(old.numel(), dtype=torch.float32).reshape(-1, 1, *old)
    # Rᵀ, row i the i-th basis patch resized: resized in float32 like timm, pseudo-inverted in float64 for accuracy.
    resize = F.interpolate(basis, size=(patch_size, patch_size), mode="bicubic", antialias=True, align_corners=False)
    inverse = torch.linalg.pinv(resize.flatten(1).double())  # (new patch pixels, old patch pixels)
    resampled = kernel.flatten(2).double() @ inverse.T
    return resampled.reshape(*kernel.shape[:2], patch_size, patch_size).to(kernel.dtype)


def fold_cls_position(cls_token: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS token and patch-position table `(N, D)` from a position table `(1, [1 +] N, D)` that may hold a CLS entry:
    EoMT gives CLS no position, so the entry joins the token (as timm's DINOv2 loader does)."""
    positions = positions.reshape(-1, positions.shape[-1])
    extra = positions.shape[0] - math.isqrt(positions.shape[0]) ** 2
    if extra == 1:
        return cls_token + positions[0], positions[1:]
    if extra:
        raise BackboneError(
            f"The position table has {positions.shape[0]} entries: neither a square patch grid nor one with a CLS "
            "entry; the file holds no DINOv2 ViT."
        )
    return cls_token, positions


def fit_weights(weights: dict[str, torch.Tensor], family: Family, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Trunk weights with the patch kernel resampled to `config.patch_size` and the position grid resized to the
    grid of `config.image_size` (both unchanged when they already fit)."""
    patch_size, grid_side = patch_grid(config.image_size, config.patch_size)
    fitted = dict(weights)
    old_patch = fitted[family.kernel_key].shape[-1]
    fitted[family.kernel_key] = resample_patch_kernel(fitted[family.kernel_key], patch_size)
    if family.position_key is not None:
        table = fitted[family.position_key]
        side = math.isqrt(table.shape[0])
        fitted[family.position_key] = resize_position_grid(table, (side, side), (grid_side, grid_side))
    if old_patch != patch_size:
        logger.info(f"Resampled the {old_patch}×{old_patch} patch kernel to {patch_size}×{patch_size}.")
    return fitted


def patch_grid(image_size: int | list[int], patch_size: int | list[int]) -> tuple[int, int]:
    """Patch size and grid side for an EoMT config's sizes, or the error for a patch size no resampling reaches."""
    image_side, patch_side = _side(image_size), _side(patch_size)
    if image_side is None or patch_side is None or not 0 < patch_side <= image_side:
        raise BackboneError(
            f"The patch kernel cannot be resampled to patch_size {patch_size!r} for image_size {image_size!r}: both "
            "must be square and positive, the patch no larger than the image."
        )
    if image_side % patch_side:
        raise BackboneError(
            f"patch_size {patch_side} does not tile image_size {image_side}, so the position grid has no size to be "
            f"resized to; pick a multiple of it as image_size (e.g. {image_side // patch_side * patch_side})."
        )
    return patch_side, image_side // patch_side


def _side(size: int | list[int] | tuple[int, int]) -> int | None:
    if isinstance(size, (list, tuple)):
        return int(size[0]) if len(size) == 2 and size[0] == size[1] else None
    return size if isinstance(size, int) else None


# ------------------------------------------------------------------------------------------------------------- readers
def find_backbone(name_or_path: str | Path) -> Backbone:
    """The backbone behind a Hub id, a local transformers or timm folder, or a timm state-dict file.

    Reads configs (and a bare state dict, whose shapes are its only config), never the weights of a transformers
    model: `Backbone.read_weights` does that.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        return _timm_backbone(name, _load_state_dict(path), model_args={})
    if path.suffix in STATE_DICT_SUFFIXES and not path.exists():
        raise BackboneError(f"{name} does not exist; pass an existing state-dict file, a folder or a Hub id.")
    try:
        config_file = cached_file(name, "config.json")
        raw = json.loads(Path(config_file).read_text())
        # timm folders (config.json with `architecture`, no `model_type`) are read without timm installed;
        # transformers would need it for its TimmWrapperConfig.
        config = None if "architecture" in raw and "model_type" not in raw else AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise BackboneError(
            f"Could not read a backbone config from {name!r} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"Pass a local folder or a Hub id that is reachable (offline, only cached ones are), e.g. {EXAMPLES}."
        ) from error
    if config is None:
        architecture, model_type = raw["architecture"], "timm"
        if "dinov2" in architecture:
            weights = _timm_weight_file(name)
            if weights is None:
                raise BackboneError(
                    f"{name} names timm's {architecture} but holds no {' or '.join(TIMM_WEIGHT_FILES)}."
                )
            return _timm_backbone(name, _load_state_dict(weights), raw.get("model_args") or {})
    else:
        model_type, architecture = config.model_type, ""
        if model_type in DINOV2_MODEL_TYPES:
            return Backbone(name, DINOV2, dinov2_fields(config), lambda: map_dinov2(_read_transformers(name, config)))
        if model_type == DINOV3_MODEL_TYPE:
            return Backbone(name, DINOV3, dinov3_fields(config), lambda: map_dinov3(_read_transformers(name, config)))
    kind = f"timm's {architecture}" if architecture else f"model type {model_type!r}"
    raise BackboneError(
        f"{name} is {kind}, not a DINOv2 or DINOv3 ViT: EoMT starts from those only (their LayerScale blocks and "
        f"register tokens). Pass one of them, e.g. {EXAMPLES}."
    )


def _timm_weight_file(name: str) -> Path | None:
    for filename in TIMM_WEIGHT_FILES:
        path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            return Path(path)
    return None


def _read_transformers(name: str, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The state dict of transformers' own model class for `config` (Dinov2Model, DINOv3ViTModel, ...)."""
    try:
        model: PreTrainedModel = AutoModel.from_pretrained(name, config=config)
    except OSError as error:  # weights missing, gated or unreachable
        raise BackboneError(f"Could not read the weights of {name} ({error}).") from error
    return model.state_dict()


def dinov2_fields(config: PretrainedConfig) -> dict[str, Any]:
    """EomtConfig fields of a transformers DINOv2 (with or without registers) config."""
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_channels": config.num_channels,
        "num_register_tokens": getattr(config, "num_register_tokens", 0),
        "mlp_ratio": config.mlp_ratio,
        "use_swiglu_ffn": config.use_swiglu_ffn,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "layerscale_value": config.layerscale_value,
    }


def dinov3_fields(config: PretrainedConfig) -> dict[str, Any]:
    """Fields of the DINOv3 EoMT config (model type "eomt_dinov3") for a transformers DINOv3 ViT config."""
    copied = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "layer_norm_eps", "num_channels", "num_register_tokens", "layerscale_value", "query_bias", "key_bias",
        "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp", "pos_embed_shift", "pos_embed_jitter",
        "pos_embed_rescale",
    )  # fmt: skip
    fields = {field: getattr(config, field) for field in copied}
    fields["rope_parameters"] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    return fields


def map_dinov2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EoMT trunk weights from a transformers DINOv2 state dict: `encoder.layer.N` → `layers.N`, `o_proj` →
    `out_proj`, the CLS position folded into the CLS token, the mask token dropped."""
    mapped = {}
    for key, tensor in state_dict.items():
        if key == "embeddings.mask_token":
            continue
        key = re.sub(r"^encoder\.layer\.(\d+)\.", r"layers.\1.", key)
        mapped[key.replace(".attention.o_proj.", ".attention.out_proj.")] = tensor
    cls_token, positions = fold_cls_position(
        mapped.pop("embeddings.cls_token"), mapped.pop("embeddings.position_embeddings")
    )
    mapped["embeddings.cls_token"], mapped[DINOV2.position_key] = cls_token, positions
    # Without `qkv_bias` DINOv2 has no q/k/v biases; EoMT always has them, so they are zero.
    for key in [k for k in mapped if re.fullmatch(r"layers\.\d+\.attention\.q_proj\.weight", k)]:
        for projection in ("q_proj", "k_proj", "v_proj"):
            bias = key.replace("q_proj.weight", f"{projection}.bias")
            mapped.setdefault(bias, mapped[key].new_zeros(mapped[key].shape[0]))
    mapped.setdefault("embeddings.register_tokens", cls_token.new_zeros(1, 0, cls_token.shape[-1]))
    return mapped


def map_dinov3(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv3 EoMT trunk weights from a transformers DINOv3 ViT state dict: `model.layer.N` → `layers.N`, `norm` →
    `layernorm`, the mask token dropped."""
    mapped = {}
    for key, tensor in state_dict.items():
        if key == "embeddings.mask_token":
            continue
        key = re.sub(r"^model\.layer\.(\d+)\.", r"layers.\1.", key)
        mapped[re.sub(r"^norm\.", "layernorm.", key)] = tensor
    return mapped


def map_timm_dinov2(state_dict: dict[str, torch.Tensor], use_swiglu_ffn: bool) -> dict[str, torch.Tensor]:
    """EoMT trunk weights from a timm DINOv2 ViT state dict (`vit_*_patch14[_reg4]_dinov2`)."""
    state_dict = dict(state_dict)
    cls_token, positions = fold_cls_position(state_dict.pop("cls_token"), state_dict.pop("pos_embed"))
    mapped = {"embeddings.cls_token": cls_token, DINOV2.position_key: positions}
    mapped["embeddings.register_tokens"] = state_dict.pop("reg_token", cls_token.new_zeros(1, 0, cls_token.shape[-1]))
    rules = [(name_pattern(source), targets) for source, targets in
             TIMM_DINOV2_NAMES + TIMM_DINOV2_MLP_NAMES[use_swiglu_ffn]]  # fmt: skip
    for key, tensor in state_dict.items():
        if key.startswith("head."):  # a classifier on top of the trunk, not part of it
            continue
        for pattern, targets in rules:
            match = pattern.match(key)
            if match:
                for target, chunk in zip(targets, tensor.chunk(len(targets), dim=0)):
                    mapped[target.format(**match.groupdict())] = chunk
                break
        else:
            raise BackboneError(
                f"Key {key!r} of the state dict has no counterpart in a DINOv2 ViT: the file holds another model "
                f"(EoMT starts from DINOv2 or DINOv3), e.g. {EXAMPLES}."
            )
    return mapped


def _timm_backbone(name: str, state_dict: dict[str, torch.Tensor], model_args: dict) -> Backbone:
    """A timm DINOv2 state dict: its shapes give the architecture, timm's `model_args` (if any) the head count."""
    if not {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.ls1.gamma"} <= state_dict.keys():
        example = next(iter(state_dict), "<empty>")
        raise BackboneError(
            f"{name} is not a timm DINOv2 ViT state dict (no cls_token, pos_embed, patch_embed or LayerScale; e.g. "
            f"{example!r}); EoMT starts from DINOv2 or DINOv3 backbones, e.g. {EXAMPLES}."
        )
    hidden_size = state_dict["cls_token"].shape[-1]
    fc1, fc2 = state_dict["blocks.0.mlp.fc1.weight"], state_dict["blocks.0.mlp.fc2.weight"]
    use_swiglu_ffn = fc1.shape[0] == 2 * fc2.shape[1]
    # EoMT's SwiGLU keeps two thirds of `mlp_ratio · D`, rounded up to a multiple of 8; its GELU MLP all of it.
    mlp_ratio = round(fc2.shape[1] * 3 / (2 * hidden_size)) if use_swiglu_ffn else fc1.shape[0] // hidden_size
    width = (int(hidden_size * mlp_ratio * 2 / 3) + 7) // 8 * 8 if use_swiglu_ffn else hidden_size * mlp_ratio
    if width != fc2.shape[1]:
        raise BackboneError(
            f"{name}: an MLP {fc2.shape[1]} wide matches no integer mlp_ratio of EoMT for width {hidden_size}."
        )
    fields = {
        "hidden_size": hidden_size,
        "num_hidden_layers": 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")),
        "num_channels": state_dict["patch_embed.proj.weight"].shape[1],
        "num_register_tokens": state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0,
        "mlp_ratio": mlp_ratio,
        "use_swiglu_ffn": use_swiglu_ffn,
    }
    heads = model_args.get("num_heads", DINOV2_HEADS.get(hidden_size))
    if heads is not None:
        fields["num_attention_heads"] = heads
    mapped = map_timm_dinov2(state_dict, use_swiglu_ffn)  # checks every key before anything is built
    return Backbone(name, DINOV2, fields, lambda: mapped)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file, never unpickling anything but tensors."""
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise BackboneError(
            f"{path} is not a plain state dict of tensors (objects are never unpickled here); save only the state "
            "dict, preferably as safetensors."
        ) from error
    state_dict = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise BackboneError(f"{path} holds no state dict (name → tensor); save the model's `state_dict()`.")
    return state_dict


# ------------------------------------------------------------------------------------------------------------- builder
def dinov3_target() -> tuple[type[PretrainedConfig], Callable[[PretrainedConfig], PreTrainedModel]]:
    """Config class and model factory of the DINOv3 EoMT (model type "eomt_dinov3")."""
    return EomtDinov3Config, EomtDinov3ForUniversalSegmentation


def merged_fields(backbone: Backbone, config_fields: dict[str, Any]) -> dict[str, Any]:
    """The backbone's fields, the paper's number of query blocks for its width, then the caller's fields; an override
    that contradicts the weights' shapes is refused."""
    for field, value in config_fields.items():
        if field in backbone.fields and field not in TUNABLE_FIELDS and value != backbone.fields[field]:
            raise BackboneError(
                f"{field}={value!r} contradicts the backbone {backbone.name} ({field}={backbone.fields[field]!r}); "
                "drop the override: the pretrained weights fix it."
            )
    fields = {**backbone.fields, **config_fields}
    if "num_blocks" not in fields and backbone.fields["hidden_size"] in PAPER_NUM_BLOCKS:
        fields["num_blocks"] = PAPER_NUM_BLOCKS[backbone.fields["hidden_size"]]
    unknown = {
        "num_blocks": "the paper used no backbone of this width",
        "num_attention_heads": "a state dict cannot tell the head count",
    }
    for field, why in unknown.items():
        if field not in fields:
            raise BackboneError(f"Pass {field}=... for {backbone.name}: {why}.")
    return fields


def from_backbone(model_class: type[PreTrainedModel], name_or_path: str | Path, **config_fields) -> PreTrainedModel:
    """An EoMT whose ViT trunk holds the weights of a pretrained DINOv2 / DINOv3 backbone.

    DINOv2 backbones start `model_class` (DINOv2 EoMT); DINOv3 backbones start the DINOv3 EoMT. `config_fields`
    override the config (`image_size`, `patch_size`, `num_queries`, `num_blocks`, `id2label`, ...); by default the
    paper's patch size 16 at 640 pixels, with its number of query blocks for the backbone's width. Raises
    `BackboneError` for a source that is no DINOv2/DINOv3 ViT, cannot be read, or cannot be fitted to the config,
    before any model is built.
    """
    backbone = find_backbone(name_or_path)
    config_class, build = (model_class.config_class, model_class) if backbone.family is DINOV2 else dinov3_target()
    fields = merged_fields(backbone, config_fields)
    # A patch size the resampling cannot reach fails here, before any weight is read.
    patch_grid(fields.get("image_size", config_class.image_size), fields.get("patch_size", config_class.patch_size))
    config = config_class(**fields)
    weights = fit_weights(backbone.read_weights(), backbone.family, config)
    model = build(config)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise BackboneError(f"The weights of {backbone.name} do not fit the EoMT trunk: {error}") from error
    missing = [key for key in missing if not key.startswith(HEAD_PREFIXES)]
    if missing or unexpected:
        raise BackboneError(
            f"The weights of {backbone.name} do not fit the EoMT trunk (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); the backbone is a modified {backbone.family.name} ViT."
        )
    logger.info(f"EoMT trunk loaded from {backbone.name}; queries and heads are freshly initialised.")
    return model
