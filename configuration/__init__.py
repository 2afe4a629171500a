from .configuration_eomt import EomtBaseConfig, EomtConfig, EomtDinov3Config
from .constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, TASKS
from .presets import DINOV3_SIZES, PRESETS, SIZES, Preset

__all__ = [
    "DINOV3_SIZES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "SIZES",
    "TASKS",
    "EomtBaseConfig",
    "EomtConfig",
    "EomtDinov3Config",
    "Preset",
]
