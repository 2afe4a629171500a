from .configuration_eomt import EomtConfig
from .constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, TASKS
from .presets import PRESETS, SIZES, Preset

__all__ = ["IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "SIZES", "TASKS", "EomtConfig", "Preset"]
