"""EoMT for the Hugging Face ecosystem. Importing this package registers our classes with the Auto classes."""

from .configuration import EomtConfig
from .image_processing import EomtImageProcessor
from .modeling import EomtForUniversalSegmentation, EomtForUniversalSegmentationOutput, EomtPreTrainedModel
from .registration import register_auto_classes

register_auto_classes()

__all__ = [
    "EomtConfig",
    "EomtForUniversalSegmentation",
    "EomtForUniversalSegmentationOutput",
    "EomtImageProcessor",
    "EomtPreTrainedModel",
    "register_auto_classes",
]
