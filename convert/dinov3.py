"""The original release's DINOv3 checkpoints: backbone weights stored as deltas against a DINOv3 backbone.

The release builds its DINOv3 backbone from transformers' `DINOv3ViTModel` and renames two of its modules
(`embeddings` → `patch_embed`, `layer` → `blocks`), so a checkpoint holds `network.encoder.backbone.patch_embed.
cls_token`, `….blocks.N.attention.q_proj.weight`, … Its loader adds the checkpoint to a state dict in which
everything outside the encoder is zero and the buffers keep their values: backbone = base + delta, the heads as
stored, and `attn_mask_probs` = 1 + stored (the buffer starts at ones). Here the deltas are merged back in the
release's names, so the reference forward and the name mapping see an ordinary, absolute checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers.utils import logging

from ..configuration import DINOV3_SIZES, IMAGENET_MEAN, IMAGENET_STD
from ..configuration.presets import BASE_BACKBONES
from .errors import ConversionError

logger = logging.get_logger(__name__)

BACKBONE = "network.encoder.backbone."
# Base names (transformers' DINOv3 files say `layer.N`, its 5.x modules `model.layer.N`) → the release's names.
_BASE_RENAMES = (
    (re.compile(r"embeddings\.mask_token$"), None),  # masked-image pre-training only; the release deletes it
    (re.compile(r"embeddings\."), BACKBONE + "patch_embed."),
    (re.compile(r"(?:model\.)?layer\.(\d+)\."), BACKBONE + r"blocks.\1."),
    (re.compile(r"norm\."), BACKBONE + "norm."),
)
# Tensors a release checkpoint may hold that carry no weights (RoPE frequencies follow from the config).
_DROPPED = (BACKBONE + "rope_embeddings.inv_freq",)
ATTN_MASK_PROBS_STORAGE = ("raw", "delta")


def is_dinov3_checkpoint(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether an original state dict has the release's DINOv3 names (transformers modules, not timm's)."""
    names = (BACKBONE + "patch_embed.cls_token", BACKBONE + "blocks.0.attention.q_proj.weight")
    return any(name in state_dict for name in names)


def load_base_backbone(name_or_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], object]:
    """The base backbone's tensors in the release's names, and its `DINOv3ViTConfig`."""
    from transformers import AutoConfig, DINOv3ViTConfig, DINOv3ViTModel

    fix = (
        "pass --base-backbone with a Hub id such as facebook/dinov3-vitl16-pretrain-lvd1689m (gated: accept its "
        "licence and log in with `hf auth login`) or a local folder in transformers' DINOv3 format"
    )
    text = str(name_or_path)
    if not Path(text).expanduser().exists() and (
        Path(text).is_absolute() or text.startswith(".") or text.count("/") != 1
    ):
        raise ConversionError(f"The base backbone folder {text} does not exist; {fix}.")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # missing, offline, gated, unreadable or invalid config.json, …
        raise ConversionError(f"Cannot load the base backbone {name_or_path!s} ({_summary(error)}); {fix}.") from error
    if not isinstance(config, DINOv3ViTConfig):
        raise ConversionError(
            f"The base backbone {name_or_path!s} is a {config.model_type!r} model, not DINOv3 ('dinov3_vit'); {fix}."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(
            f"The base backbone {name_or_path!s} uses RoPE type {rope['rope_type']!r}, but DINOv3 EoMT only has the "
            "'default' RoPE (theta-scaled patch coordinates); pass a base backbone with the default RoPE."
        )
    try:
        model, loading = DINOv3ViTModel.from_pretrained(name_or_path, config=config, output_loading_info=True)
    except Exception as error:  # missing or damaged weight files
        raise ConversionError(
            f"Cannot load the weights of the base backbone {name_or_path!s} ({_summary(error)}); {fix}."
        ) from error
    if loading["missing_keys"]:  # transformers would fill them with random values
        raise ConversionError(
            f"The base backbone {name_or_path!s} lacks {len(loading['missing_keys'])} weights (e.g. "
            f"{min(loading['missing_keys'])!r}); its files are incomplete: {fix}."
        )
    tensors = {}
    for name, tensor in model.state_dict().items():
        for pattern, replacement in _BASE_RENAMES:
            if pattern.match(name):
                if replacement is not None:
                    tensors[pattern.sub(replacement, name, count=1)] = tensor
                break
        else:
            raise ConversionError(
                f"The base backbone {name_or_path!s} holds {name!r}, which DINOv3 does not have; {fix}."
            )
    return tensors, config


def merge_deltas(
    deltas: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    base_config,
    base_name: str | os.PathLike,
) -> dict[str, torch.Tensor]:
    """The absolute state dict, in the release's names: backbone = base + delta (or as stored, if it holds
    absolute weights: see `_stores_deltas`), the pixel statistics as decided from their values, everything else as
    stored (`attn_mask_probs` goes through `absolute_attn_mask_probs`)."""
    backbone = {key for key in deltas if key.startswith(BACKBONE) and key not in _DROPPED}
    width = deltas[BACKBONE + "patch_embed.cls_token"].shape[-1] if BACKBONE + "patch_embed.cls_token" in deltas else 0
    depth = len({key.split(".")[4] for key in backbone if key.startswith(BACKBONE + "blocks.")})
    if (width, depth) != (base_config.hidden_size, base_config.num_hidden_layers):
        size = next((s for s, spec in DINOV3_SIZES.items() if spec["hidden_size"] == width), None)
        hint = f" (a {size} one: {BASE_BACKBONES['dinov3'][size]})" if size else ""
        raise ConversionError(
            f"The base backbone {base_name!s} (width {base_config.hidden_size}, {base_config.num_hidden_layers} layers)"
            f" does not fit the checkpoint's deltas (width {width}, {depth} layers); pass --base-backbone with the "
            f"DINOv3 backbone the checkpoint was trained from{hint}."
        )
    for key in sorted(backbone ^ base.keys()):
        where = "the checkpoint's deltas" if key in backbone else f"the base backbone {base_name!s}"
        raise ConversionError(
            f"{key!r} exists only in {where}: the checkpoint and the base backbone differ in architecture; pass the "
            "--base-backbone the checkpoint was trained from."
        )
    for key in backbone:
        if deltas[key].shape != base[key].shape:
            raise ConversionError(
                f"{key!r} has shape {tuple(deltas[key].shape)} in the checkpoint but {tuple(base[key].shape)} in the "
                f"base backbone {base_name!s}; pass the --base-backbone the checkpoint was trained from."
            )
    stored_as_deltas = _stores_deltas({key: deltas[key] for key in backbone}, base, base_name)
    merged = {}
    for key, tensor in deltas.items():
        if key in _DROPPED:
            continue
        if key in backbone and stored_as_deltas:
            dtype = torch.promote_types(torch.promote_types(tensor.dtype, base[key].dtype), torch.float32)
            tensor = base[key].to(dtype) + tensor.to(dtype)
        merged[key] = tensor
    for key, default in (("network.encoder.pixel_mean", IMAGENET_MEAN), ("network.encoder.pixel_std", IMAGENET_STD)):
        # Buffers of the encoder: the loader adds them to the ImageNet statistics too. They never train, so their
        # delta is zero; a file holding the statistics themselves stored them raw.
        if key in merged and bool((merged[key].abs() < 1e-3).all()):
            merged[key] = merged[key] + torch.tensor(default, dtype=merged[key].dtype).view(merged[key].shape)
    return merged


def _stores_deltas(stored: dict[str, torch.Tensor], base: dict[str, torch.Tensor], base_name) -> bool:
    """Whether the backbone is stored as deltas (the release's default) or absolute (a run with `delta_weights
    False`), told apart by size: fine-tuning moves a weight by a fraction of its norm, so a delta is much smaller
    than the base tensor and an absolute weight lies close to it. Measured per tensor (the median, so that no one
    kind of tensor decides); a tensor cannot pass both tests, and the median passing neither means the base is not
    the checkpoint's."""
    sizes, distances = [], []
    for key, tensor in stored.items():
        reference = base[key].double()
        norm = float(reference.norm())
        if norm > 0:  # zero-initialised biases tell nothing
            sizes.append(float(tensor.double().norm()) / norm)
            distances.append(float((tensor.double() - reference).norm()) / norm)
    size, distance = (float(torch.tensor(values).median()) if values else 0.0 for values in (sizes, distances))
    if size < 0.5:
        return True
    if distance < 0.5:
        logger.warning(
            "The checkpoint's backbone holds absolute weights (not deltas against the base): taken as stored."
        )
        return False
    raise ConversionError(
        f"The checkpoint's backbone is neither deltas against the base backbone {base_name!s} (its tensors are "
        f"{size:.2f} of the base's norm, in the median) nor absolute weights close to it ({distance:.2f} of its norm "
        "away); pass the --base-backbone the checkpoint was trained from."
    )


def absolute_attn_mask_probs(stored: torch.Tensor, storage: str | None = None) -> torch.Tensor:
    """The masking probabilities from the stored tensor: `storage` "raw" (the probabilities), "delta" (against the
    buffer's initial ones, as the release's loader reads them) or None to decide from the values: raw
    probabilities lie in [0, 1], deltas in [-1, 0]. All zeros fits both (annealed away, or never annealed):
    refused unless `storage` says."""
    values = stored.double()
    name = "`network.attn_mask_probs`"
    if storage is None:
        if bool((values < 0).any()) and not bool((values > 0).any()):
            storage = "delta"
        elif bool((values > 0).any()) and not bool((values < 0).any()):
            storage = "raw"
        elif not bool(values.any()):
            raise ConversionError(
                f"{name} is all zeros, which fits both ways of storing it: raw, masked attention is annealed away "
                "(p = 0, a finished training run); as a delta against 1, it is fully on (p = 1, before annealing). "
                "Pass --attn-mask-probs raw (most likely for a final checkpoint) or --attn-mask-probs delta."
            )
        else:
            raise ConversionError(
                f"{name} is {values.tolist()}: mixed signs are neither probabilities nor deltas against 1; the file "
                "is damaged or not from the release. Pass --attn-mask-probs raw|delta if you know how it was stored."
            )
    elif storage not in ATTN_MASK_PROBS_STORAGE:
        raise ConversionError(
            f"Unknown --attn-mask-probs {storage!r}; choose one of {', '.join(ATTN_MASK_PROBS_STORAGE)}."
        )
    probs = values + 1 if storage == "delta" else values
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ConversionError(
            f"{name} read as {storage} gives probabilities {probs.tolist()} outside [0, 1]; "
            f"pass --attn-mask-probs {'raw' if storage == 'delta' else 'delta'} or check the file."
        )
    logger.info(f"attn_mask_probs stored {storage}: {probs.tolist()}")
    return probs.to(stored.dtype)


def _summary(error: Exception) -> str:
    """Type and first line of an error, for a one-line message."""
    text = str(error).strip().strip("\"'")
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
