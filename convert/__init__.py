"""Conversion of the original EoMT release's checkpoints (`python -m modeling_eomt.convert`, `eomt-convert`)."""

from ..model_card import build_model_card
from .convert import ConversionResult, convert_checkpoint, map_state_dict, resolve_target
from .errors import ConversionError
from .reference import reference_forward

__all__ = [
    "ConversionError",
    "ConversionResult",
    "build_model_card",
    "convert_checkpoint",
    "map_state_dict",
    "reference_forward",
    "resolve_target",
]
