"""Original release names → ours: the rules per backbone family, and the mapping of a state dict (as views, no
copies) with its shape checks against the target config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import logging

from ..configuration import (
    DINOV3_SIZES,
    SIZES,
    EomtBaseConfig,
    EomtConfig,
)
from ..timm_names import TIMM_DINOV2_MLP_NAMES, TIMM_DINOV2_NAMES, name_pattern
from .errors import ConversionError

logger = logging.get_logger(__name__)


# Original name → our name(s). `{n}` is a block/layer index, `{p}` weight or bias. Several targets split the tensor
# into equal chunks along dim 0 (timm's fused qkv rows are q|k|v; packed SwiGLU fc1 rows are gate|up).
BACKBONE_PREFIX = "network.encoder.backbone."
# The release's DINOv2 backbone is timm's ViT.
_DINOV2_RULES = {
    swiglu: [
        (BACKBONE_PREFIX + source, targets) for source, targets in TIMM_DINOV2_NAMES + TIMM_DINOV2_MLP_NAMES[swiglu]
    ]
    for swiglu in (False, True)
}
# The release's DINOv3 backbone is transformers' DINOv3ViTModel with `embeddings` → `patch_embed`, `layer` → `blocks`.
_DINOV3_RULES: list[tuple[str, tuple[str, ...] | None]] = [
    (BACKBONE_PREFIX + "patch_embed.cls_token", ("embeddings.cls_token",)),
    (BACKBONE_PREFIX + "patch_embed.register_tokens", ("embeddings.register_tokens",)),
    (BACKBONE_PREFIX + "patch_embed.patch_embeddings.{p}", ("embeddings.patch_embeddings.{p}",)),
    *(
        (BACKBONE_PREFIX + f"blocks.{{n}}.{module}.{{p}}", (f"layers.{{n}}.{module}.{{p}}",))
        for module in (
            *(f"attention.{x}_proj" for x in "qkvo"),
            *(f"mlp.{x}_proj" for x in ("gate", "up", "down")),
        )
    ),
    (BACKBONE_PREFIX + "blocks.{n}.layer_scale1.lambda1", ("layers.{n}.layer_scale1.lambda1",)),
    (BACKBONE_PREFIX + "blocks.{n}.layer_scale2.lambda1", ("layers.{n}.layer_scale2.lambda1",)),
    (BACKBONE_PREFIX + "blocks.{n}.norm1.{p}", ("layers.{n}.norm1.{p}",)),
    (BACKBONE_PREFIX + "blocks.{n}.norm2.{p}", ("layers.{n}.norm2.{p}",)),
    (BACKBONE_PREFIX + "norm.{p}", ("layernorm.{p}",)),
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
                f"Key {key!r} of the checkpoint has no counterpart in EoMT ({describe(config)}); the file holds "
                "another model or a modified EoMT. Convert an unmodified checkpoint of the original release."
            )
    for name in expected:
        if name not in converted and name not in DERIVED_KEYS:
            raise ConversionError(
                f"The checkpoint lacks {_original_name(name, rules)!r} (needed for {name!r} of {describe(config)}); "
                "check --preset/--backbone and the size flags, or that the file is complete."
            )
    return converted


def _fit_shape(
    key: str, name: str, tensor: torch.Tensor, expected: dict[str, torch.Size], config: EomtConfig
) -> torch.Tensor:
    shape = expected.get(name)
    if shape is None:  # e.g. block 30 of a 24-block backbone
        raise ConversionError(
            f"Key {key!r} does not fit {describe(config)} (no {name!r}); pick the preset or --backbone that matches "
            "the checkpoint."
        )
    if tensor.shape != shape and tensor.shape[0] == 1 and tensor.shape[1:] == shape:
        tensor = tensor[0]  # timm keeps a batch axis on pos_embed
    if tensor.shape != shape:
        raise ConversionError(
            f"Tensor {key!r} has shape {tuple(tensor.shape)} but {describe(config)} expects {tuple(shape)} for "
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


def describe(config: EomtBaseConfig) -> str:
    sizes = DINOV3_SIZES if config.uses_rope else SIZES
    size = next((s for s, spec in sizes.items() if spec["hidden_size"] == config.hidden_size), "custom")
    return (
        f"EoMT-{size}{' (DINOv3)' if config.uses_rope else ''} (image_size={config.image_size}, num_queries={config.num_queries}, "
        f"num_labels={config.num_labels}, num_blocks={config.num_blocks})"
    )
