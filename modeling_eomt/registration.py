"""Registration of our classes with the Auto classes for model types "eomt" and "eomt_dinov3", in place of
transformers' built-in EoMT.

Checkpoints of the `tue-mps` Hub organisation and folders saved by this package then load into `modeling_eomt`
classes through `AutoConfig`, `AutoModel`, `AutoModelForUniversalSegmentation`, `AutoModelForImageSegmentation`,
`AutoImageProcessor` and `pipeline("image-segmentation")`. Nothing else of transformers changes: the built-in classes
save and load as before.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageSegmentation, AutoModelForUniversalSegmentation

from .image_processing import register_image_processor
from .modeling import MODEL_CLASSES


def register_auto_classes() -> None:
    """Map model types "eomt" and "eomt_dinov3" to our configs, models and image processor (idempotent)."""
    for model_class in MODEL_CLASSES.values():
        config_class = model_class.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        # The image-segmentation pipeline tries AutoModelForImageSegmentation before falling back to the class named
        # in `config.architectures`, which it looks up in `transformers` itself (and would find the built-in EoMT).
        for auto_class in (AutoModel, AutoModelForUniversalSegmentation, AutoModelForImageSegmentation):
            auto_class.register(config_class, model_class, exist_ok=True)
    register_image_processor()
