"""EoMT for the Hugging Face ecosystem. Importing this package registers our classes with the Auto classes."""

from .configuration import EomtConfig
from .modeling import EomtForUniversalSegmentation, EomtForUniversalSegmentationOutput, EomtPreTrainedModel
from .registration import register_auto_classes

register_auto_classes()

__all__ = [
    "EomtConfig",
    "EomtForUniversalSegmentation",
    "EomtForUniversalSegmentationOutput",
    "EomtPreTrainedModel",
    "register_auto_classes",
]
