from .configuration_eomt import EomtConfig
from .presets import PRESETS, SIZES, Preset

__all__ = ["PRESETS", "SIZES", "EomtConfig", "Preset"]
