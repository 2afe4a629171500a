"""Registration of our classes with the Auto classes for model type "eomt", replacing transformers' built-in EoMT.

Checkpoints of the `tue-mps` Hub organisation (model type "eomt") and folders saved by this package then load into
`modeling_eomt` classes through `AutoConfig`, `AutoModel`, `AutoModelForUniversalSegmentation`,
`AutoModelForImageSegmentation`, `AutoImageProcessor` and `pipeline("image-segmentation")`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageSegmentation, AutoModelForUniversalSegmentation
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming

from .configuration import EomtConfig
from .image_processing import register_image_processor
from .modeling import EomtForUniversalSegmentation

# Checkpoints written before transformers 5 pack the SwiGLU gate and up projections as `weights_in`.
LEGACY_SWIGLU_NAMES = [
    WeightConverter(
        "mlp.weights_in.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], operations=[Chunk(dim=0)]
    ),
    WeightConverter("mlp.weights_in.bias", ["mlp.gate_proj.bias", "mlp.up_proj.bias"], operations=[Chunk(dim=0)]),
    WeightRenaming("mlp.weights_out", "mlp.down_proj"),
]


def register_auto_classes() -> None:
    """Map model type "eomt" to our config, model and image processor in every Auto class (idempotent)."""
    AutoConfig.register(EomtConfig.model_type, EomtConfig, exist_ok=True)
    # The image-segmentation pipeline tries AutoModelForImageSegmentation before falling back to the class named in
    # `config.architectures`, which it looks up in `transformers` itself (and would find the built-in EoMT).
    for auto_class in (AutoModel, AutoModelForUniversalSegmentation, AutoModelForImageSegmentation):
        auto_class.register(EomtConfig, EomtForUniversalSegmentation, exist_ok=True)
    register_checkpoint_conversion_mapping(EomtForUniversalSegmentation.__name__, LEGACY_SWIGLU_NAMES, overwrite=True)
    register_image_processor()
