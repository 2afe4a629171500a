"""Weight names of older checkpoints, read on load only (saves always use today's names)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import conversion_mapping
from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming


def _legacy_swiglu() -> list:
    # Checkpoints written before transformers 5 pack the SwiGLU gate and up projections as `weights_in`.
    return [
        WeightConverter(
            "mlp.weights_in.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], operations=[Chunk(dim=0)]
        ),
        WeightConverter("mlp.weights_in.bias", ["mlp.gate_proj.bias", "mlp.up_proj.bias"], operations=[Chunk(dim=0)]),
        WeightRenaming("mlp.weights_out", "mlp.down_proj"),
    ]


@contextlib.contextmanager
def legacy_swiglu_names(class_name: str) -> Iterator[None]:
    """Within the block, `from_pretrained` of `class_name` reads the legacy SwiGLU names.

    transformers keys conversions by class name, and ours shares its name with the built-in class; a registration
    left in place would make the built-in save `weights_in` too. So the mapping exists only while we load.
    """
    previous = conversion_mapping.get_checkpoint_conversion_mapping(class_name)
    was_registered = class_name in conversion_mapping.USER_REGISTERED_MAPPINGS
    conversion_mapping.register_checkpoint_conversion_mapping(class_name, _legacy_swiglu(), overwrite=True)
    try:
        yield
    finally:
        cache = conversion_mapping._checkpoint_conversion_mapping_cache
        if previous is None:
            cache.pop(class_name, None)
        else:
            cache[class_name] = previous
        if not was_registered:
            conversion_mapping.USER_REGISTERED_MAPPINGS.discard(class_name)
