"""EoMT image processing: preprocessing, training targets and post-processing.

`geometry`: where model inputs (padded canvases, sliding windows) lie in their images; `post_processing`: the plain
panoptic, instance and semantic algorithms; `semantic_fast` and `segments_fast`: the same semantic, panoptic and
instance results in bounded memory, which the processor runs (chosen in `image_processing_eomt`); `checks`: the
post-processing arguments, checked against the outputs before any work."""

from .geometry import Layout, Placement
from .image_processing_eomt import EomtImageProcessor, EomtImageProcessorPil

__all__ = ["EomtImageProcessor", "EomtImageProcessorPil", "Layout", "Placement", "register_image_processor"]


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
