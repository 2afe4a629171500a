"""EoMT configuration: the fields of the Hub's `config.json` files, validated, plus presets of the released models."""

from __future__ import annotations

from transformers import PretrainedConfig

from .presets import PRESETS, SIZES


class EomtConfig(PretrainedConfig):
    r"""
    Configuration of an EoMT model ([`EomtForUniversalSegmentation`]). Fields, names and defaults match the
    `config.json` files of the released checkpoints (model type `"eomt"`); the defaults describe EoMT-L at 640.

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
            Standard deviation of the truncated normal used for the CLS token.
        layer_norm_eps (`float`, defaults to 1e-6):
            Epsilon of every LayerNorm.
        image_size (`int`, defaults to 640):
            Native input size (square). Position embeddings are stored for this grid and interpolated for others.
        patch_size (`int`, defaults to 16):
            Side of the square patches.
        num_channels (`int`, defaults to 3):
            Channels of the input images.
        mlp_ratio (`int`, defaults to 4):
            MLP hidden size as a multiple of `hidden_size` (SwiGLU keeps two thirds of it, rounded up to 8).
        layerscale_value (`float`, defaults to 1.0):
            Initial value of the LayerScale factors.
        drop_path_rate (`float`, defaults to 0.0):
            Stochastic depth rate, the same for every block.
        num_upscale_blocks (`int`, defaults to 2):
            Number of ×2 upscale blocks turning the patch grid into the mask grid.
        attention_dropout (`float`, defaults to 0.0):
            Dropout on the attention probabilities.
        use_swiglu_ffn (`bool`, defaults to `False`):
            Use a SwiGLU feed-forward network (the giant backbone) instead of the GELU MLP.
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

    Example:

    ```python
    >>> from modeling_eomt import EomtConfig, EomtForUniversalSegmentation
    >>> config = EomtConfig.from_preset("coco_panoptic_eomt_large_640")
    >>> model = EomtForUniversalSegmentation(config)
    ```
    """

    model_type = "eomt"

    # The ViT backbone.
    image_size: int = 640
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_ratio: int = 4
    use_swiglu_ffn: bool = False
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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.image_size = _square(self.image_size, "image_size")
        self.patch_size = _square(self.patch_size, "patch_size")
        self.check()

    def check(self) -> None:
        """Raise a `ValueError` naming the first inconsistent field (called on construction)."""
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
    def from_preset(cls, name: str, **overrides) -> EomtConfig:
        """Config of a released checkpoint (see [`list_presets`]); `overrides` replace any field."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(sorted(PRESETS))}.")
        return cls(**{**PRESETS[name].config_kwargs(), **overrides})

    @staticmethod
    def list_presets() -> list[str]:
        """Names of the released checkpoints (the Hub repos `tue-mps/<name>`)."""
        return sorted(PRESETS)

    @classmethod
    def from_size(cls, size: str, **overrides) -> EomtConfig:
        """Config of a backbone size: "small", "base", "large" or "giant"."""
        if size not in SIZES:
            raise ValueError(f"Unknown backbone size {size!r}; choose one of {', '.join(SIZES)}.")
        return cls(**{**SIZES[size], **overrides})


def _square(value: int | list[int] | tuple[int, int], name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"`{name}` must be square, got {value}.")
        value = value[0]
    return int(value)
