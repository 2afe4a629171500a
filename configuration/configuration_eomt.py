"""EoMT configuration: the fields of the Hub's `config.json` files, validated, plus presets of the released models."""

from __future__ import annotations

import dataclasses
import difflib
from typing import ClassVar

from transformers import PretrainedConfig

from .presets import DINOV3_SIZES, PRESETS, SIZES


class EomtBaseConfig(PretrainedConfig):
    r"""
    Fields shared by both backbone families of EoMT ([`EomtConfig`] for DINOv2, [`EomtDinov3Config`] for DINOv3);
    names and defaults match the `config.json` files of the released checkpoints and of transformers' built-in EoMT.
    The defaults describe EoMT-L at 640.

    Args:
        hidden_size (`int`, defaults to 1024):
            Width of the ViT (D).
        num_hidden_layers (`int`, defaults to 24):
            Number of ViT blocks (L).
        num_attention_heads (`int`, defaults to 16):
            Attention heads per block; must divide `hidden_size`.
        hidden_act (`str`, defaults to `"gelu"`):
            Activation of the MLPs, the mask head and the upscale blocks.
        hidden_dropout_prob (`float`, defaults to 0.0):
            Dropout applied to the embeddings.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the truncated normal used for the CLS token and fresh weights.
        layer_norm_eps (`float`, defaults to 1e-6):
            Epsilon of the ViT's LayerNorms (the upscale blocks always use 1e-6).
        image_size (`int`, defaults to 640):
            Native input size (square); other sizes work too (multiples of `patch_size` keep every pixel).
        patch_size (`int`, defaults to 16):
            Side of the square patches.
        num_channels (`int`, defaults to 3):
            Channels of the input images.
        layerscale_value (`float`, defaults to 1.0):
            Initial value of the LayerScale factors.
        drop_path_rate (`float`, defaults to 0.0):
            Stochastic depth rate, the same for every block.
        num_upscale_blocks (`int`, defaults to 2):
            Number of ×2 upscale blocks turning the patch grid into the mask grid.
        attention_dropout (`float`, defaults to 0.0):
            Dropout on the attention probabilities.
        num_blocks (`int`, defaults to 4):
            Number of final blocks that also process the queries (and use masked attention in training).
        no_object_weight (`float`, defaults to 0.1):
            Weight of the no-object class in the classification loss.
        class_weight (`float`, defaults to 2.0):
            Weight of the classification loss and of the class cost in matching.
        mask_weight (`float`, defaults to 5.0):
            Weight of the mask binary cross-entropy loss and cost.
        dice_weight (`float`, defaults to 5.0):
            Weight of the dice loss and cost.
        train_num_points (`int`, defaults to 12544):
            Points sampled per mask for matching and for the mask losses.
        oversample_ratio (`float`, defaults to 3.0):
            Oversampling factor of the importance sampling of loss points.
        importance_sample_ratio (`float`, defaults to 0.75):
            Fraction of the loss points chosen by uncertainty (the rest are uniform).
        num_queries (`int`, defaults to 200):
            Number of learned queries, i.e. the maximum number of predicted segments.
        num_register_tokens (`int`, defaults to 4):
            Number of register tokens of the ViT.
    """

    # The ViT backbone.
    image_size: int = 640
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    num_register_tokens: int = 4
    # Queries and head.
    num_queries: int = 200
    num_blocks: int = 4
    num_upscale_blocks: int = 2
    # Regularisation and initialisation.
    hidden_dropout_prob: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    # Loss and matching.
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75

    # How the modeling file builds the backbone family (derived, never saved): rotary position embeddings instead of
    # learned absolute ones; the MLP; biases of the q/k/v/output projections.
    uses_rope: ClassVar[bool] = False

    def __post_init__(self, **kwargs):
        _refuse_misspelled_fields(self, kwargs)
        if "num_labels" in kwargs:  # transformers' setter would fail with "'str' object cannot be interpreted ..."
            _check_type("num_labels", kwargs["num_labels"], int)
        super().__post_init__(**kwargs)
        self.image_size = _square(self.image_size, "image_size")
        self.patch_size = _square(self.patch_size, "patch_size")
        self.check()

    @property
    def mlp_hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def gated_mlp(self) -> bool:
        raise NotImplementedError

    @property
    def mlp_activation(self) -> str:
        return self.hidden_act

    @property
    def attention_bias(self) -> tuple[bool, bool, bool, bool]:
        """Whether the q, k, v and output projections have a bias."""
        return True, True, True, True

    @property
    def mlp_bias_enabled(self) -> bool:
        return True

    def check(self) -> None:
        """Raise a `TypeError`/`ValueError` naming the first ill-typed or inconsistent field (called on construction)."""
        numeric = {field.name: _NUMBER_KINDS[field.type] for field in dataclasses.fields(self)
                   if field.type in _NUMBER_KINDS}  # fmt: skip
        for name, kind in numeric.items():
            _check_type(name, getattr(self, name), kind)
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "num_channels",
            "num_queries",
            "train_num_points",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}); pick a head count that divides it."
            )
        if not 0 < self.num_blocks <= self.num_hidden_layers:
            raise ValueError(
                f"`num_blocks` ({self.num_blocks}) must be between 1 and `num_hidden_layers` "
                f"({self.num_hidden_layers}): the queries join one of the existing blocks."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})."
            )
        if self.num_register_tokens < 0 or self.num_upscale_blocks < 0:
            raise ValueError("`num_register_tokens` and `num_upscale_blocks` cannot be negative.")
        if self.num_labels is not None and self.num_labels <= 0:
            raise ValueError(f"`num_labels` must be positive, got {self.num_labels}.")
        for name in ("drop_path_rate", "hidden_dropout_prob", "attention_dropout", "importance_sample_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1], got {getattr(self, name)}.")
        if self.oversample_ratio < 1.0:
            raise ValueError(f"`oversample_ratio` must be at least 1, got {self.oversample_ratio}.")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid at the native `image_size`."""
        side = self.image_size // self.patch_size
        return side, side

    @classmethod
    def from_preset(cls, name: str, **overrides) -> EomtBaseConfig:
        """Config of a released checkpoint (see [`list_presets`]); `overrides` replace any field. DINOv3 presets give
        an [`EomtDinov3Config`] whichever class this is called on."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(sorted(PRESETS))}.")
        preset = PRESETS[name]
        config_class = EomtDinov3Config if preset.backbone == "dinov3" else EomtConfig
        return config_class(**{**preset.config_kwargs(), **overrides})

    @staticmethod
    def list_presets(details: bool = False) -> list[str] | list[dict]:
        """Names of the released checkpoints (the Hub repos `tue-mps/<name>`), or with `details=True` one dict per
        checkpoint: task, label set, queries, blocks, processor settings, backbone family and base backbone id."""
        if not details:
            return sorted(PRESETS)
        return [PRESETS[name].describe() for name in sorted(PRESETS)]

    @classmethod
    def from_size(cls, size: str, **overrides) -> EomtBaseConfig:
        """Config of a backbone size: "small", "base", "large" or "giant" (DINOv2); "small", "base", "large" with
        `EomtDinov3Config.from_size`."""
        sizes = DINOV3_SIZES if cls.uses_rope else SIZES
        if size not in sizes:
            raise ValueError(f"Unknown backbone size {size!r}; choose one of {', '.join(sizes)}.")
        return cls(**{**sizes[size], **overrides})


class EomtConfig(EomtBaseConfig):
    r"""
    Configuration of an EoMT model with a DINOv2 backbone ([`EomtForUniversalSegmentation`], model type `"eomt"`):
    learned absolute position embeddings (patch tokens only), a GELU MLP or SwiGLU. Shares the fields of
    [`EomtBaseConfig`], plus:

    Args:
        mlp_ratio (`int`, defaults to 4):
            MLP hidden size as a multiple of `hidden_size` (SwiGLU keeps two thirds of it, rounded up to 8).
        use_swiglu_ffn (`bool`, defaults to `False`):
            Use a SwiGLU feed-forward network (the giant backbone) instead of the GELU MLP.

    Example:

    ```python
    >>> from modeling_eomt import EomtConfig, EomtForUniversalSegmentation
    >>> config = EomtConfig.from_preset("coco_panoptic_eomt_large_640")
    >>> model = EomtForUniversalSegmentation(config)
    ```
    """

    model_type = "eomt"

    mlp_ratio: int = 4
    use_swiglu_ffn: bool = False

    @property
    def mlp_hidden_size(self) -> int:
        if self.use_swiglu_ffn:
            # Two thirds of the MLP width keeps the parameter count of a GELU MLP; DINOv2 rounds up to a multiple of 8.
            return (int(self.hidden_size * self.mlp_ratio * 2 / 3) + 7) // 8 * 8
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def gated_mlp(self) -> bool:
        return self.use_swiglu_ffn

    @property
    def mlp_activation(self) -> str:
        return "silu" if self.use_swiglu_ffn else self.hidden_act


class EomtDinov3Config(EomtBaseConfig):
    r"""
    Configuration of an EoMT model with a DINOv3 backbone (model type `"eomt_dinov3"`; the same fields, meanings and
    defaults as transformers' `EomtDinov3Config`, so Hub `config.json` files load unchanged): rotary position
    embeddings on the patch tokens instead of absolute ones, a key projection without bias, a plain or gated MLP.
    Shares the fields of [`EomtBaseConfig`], plus:

    Args:
        intermediate_size (`int`, defaults to 4096):
            Hidden width of the MLP.
        rope_parameters (`dict`, *optional*):
            `{"rope_theta": 100.0, "rope_type": "default"}` when not given; only the default RoPE type exists.
        query_bias, key_bias, value_bias, proj_bias (`bool`, defaults to `True`, `False`, `True`, `True`):
            Whether the q, k, v and output projections of attention have a bias.
        mlp_bias (`bool`, defaults to `True`):
            Whether the MLP's projections have a bias.
        use_gated_mlp (`bool`, defaults to `False`):
            Use a gated MLP `down(act(gate x) · up x)` instead of `down(act(up x))`.
        pos_embed_shift (`float`, *optional*):
            Training only: shift the patch coordinates by a uniform value in [-shift, shift].
        pos_embed_jitter (`float`, *optional*):
            Training only: scale each coordinate axis by a log-uniform factor in [1/jitter, jitter].
        pos_embed_rescale (`float`, *optional*, defaults to 2.0):
            Training only: scale both axes by one log-uniform factor in [1/rescale, rescale].
    """

    model_type = "eomt_dinov3"
    uses_rope = True

    # Positions: RoPE on the patch tokens, and its training-time coordinate augmentations.
    rope_parameters: dict | None = None
    pos_embed_rescale: float | None = 2.0
    pos_embed_jitter: float | None = None
    pos_embed_shift: float | None = None
    # Feed-forward network.
    use_gated_mlp: bool = False
    intermediate_size: int = 4096
    mlp_bias: bool = True
    # Attention projections: DINOv3 drops the key bias.
    key_bias: bool = False
    query_bias: bool = True
    value_bias: bool = True
    proj_bias: bool = True

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_theta": 100.0, "rope_type": "default"}
        # Before transformers standardises the RoPE parameters, which fails on other types with an unrelated error.
        rope_type = (
            self.rope_parameters.get("rope_type", "default") if isinstance(self.rope_parameters, dict) else None
        )
        if rope_type != "default":
            raise ValueError(
                f"`rope_parameters` is {self.rope_parameters!r}, but EoMT with DINOv3 only uses the 'default' RoPE; "
                'set `"rope_type": "default"` (or drop `rope_parameters`).'
            )
        super().__post_init__(**kwargs)

    def check(self) -> None:
        super().check()
        if self.head_dim % 4:
            raise ValueError(
                f"The attention head size ({self.head_dim}) must be a multiple of 4: RoPE rotates (y, x) pairs."
            )
        for name in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or (name != "pos_embed_shift" and value < 1)):
                raise ValueError(f"`{name}` must be None or {'positive' if name.endswith('shift') else '>= 1'}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 100.0))

    @property
    def mlp_hidden_size(self) -> int:
        return self.intermediate_size

    @property
    def gated_mlp(self) -> bool:
        return self.use_gated_mlp

    @property
    def attention_bias(self) -> tuple[bool, bool, bool, bool]:
        return self.query_bias, self.key_bias, self.value_bias, self.proj_bias

    @property
    def mlp_bias_enabled(self) -> bool:
        return self.mlp_bias


# Numeric fields, by their annotation, whose type a hand-edited config.json can get wrong ("32" for 32).
_NUMBER_KINDS: dict[object, type | tuple[type, ...]] = {
    "int": int,
    int: int,
    "float": (int, float),
    float: (int, float),
}


def _check_type(name: str, value, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        hint = "; write it without quotes in config.json" if isinstance(value, str) else ""
        raise TypeError(
            f"`{name}` must be {'an integer' if kind is int else 'a number'}, got {value!r} "
            f"({type(value).__name__}){hint}."
        )


def _refuse_misspelled_fields(config: EomtBaseConfig, extra: dict) -> None:
    """A keyword that is not a field but nearly spells one (`num_querys`) is a typo that would otherwise be stored
    and ignored; other extra keys (written by other tools) are kept, as transformers does."""
    fields = [field.name for field in dataclasses.fields(config)]
    for name in extra:
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.85)
        if close:
            raise TypeError(f"Unknown config field `{name}`; did you mean `{close[0]}`?")


def _square(value: int | list[int] | tuple[int, int], name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"`{name}` must be square, got {value}.")
        value = value[0]
    return value
