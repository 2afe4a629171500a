"""EoMT for the Hugging Face ecosystem. Importing this package registers our classes with the Auto classes."""

from .configuration import EomtConfig, EomtDinov3Config
from .export import export_model
from .image_processing import EomtImageProcessor
from .modeling import (
    EomtDinov3ForUniversalSegmentation,
    EomtForUniversalSegmentation,
    EomtForUniversalSegmentationOutput,
    EomtPreTrainedModel,
)
from .registration import register_auto_classes

register_auto_classes()

__all__ = [
    "EomtConfig",
    "EomtDinov3Config",
    "EomtDinov3ForUniversalSegmentation",
    "EomtForUniversalSegmentation",
    "EomtForUniversalSegmentationOutput",
    "EomtImageProcessor",
    "EomtPreTrainedModel",
    "export_model",
    "register_auto_classes",
]
