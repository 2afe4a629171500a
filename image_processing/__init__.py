"""EoMT image processing: preprocessing, training targets and post-processing."""

from .image_processing_eomt import EomtImageProcessor, EomtImageProcessorPil
from .post_processing import Placement, instance_segmentation, panoptic_segmentation, semantic_segmentation

__all__ = [
    "EomtImageProcessor",
    "EomtImageProcessorPil",
    "Placement",
    "instance_segmentation",
    "panoptic_segmentation",
    "register_image_processor",
    "semantic_segmentation",
]


def register_image_processor() -> None:
    """Make `AutoImageProcessor` (and so `pipeline("image-segmentation")`) pick `EomtImageProcessor` for model
    types "eomt" and "eomt_dinov3" under every backend name, including configs naming "EomtImageProcessor", "EomtImageProcessorFast" or
    "EomtImageProcessorPil" (idempotent)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    from ..configuration import EomtConfig, EomtDinov3Config

    # `AutoImageProcessor.register` would first resolve (import) the built-in classes to merge with them; we
    # replace every backend, so register the mapping directly. A config's class name is looked up among registered
    # classes before transformers' own, so each name it gives EoMT's processors is one of ours ("Fast" is dropped).
    backends = {"torchvision": EomtImageProcessor, "pil": EomtImageProcessorPil}
    for config_class in (EomtConfig, EomtDinov3Config):
        IMAGE_PROCESSOR_MAPPING.register(config_class, backends, exist_ok=True)
