"""What `from_pretrained` adds to transformers' loading: the legacy SwiGLU names (read on load only; saves always use
today's names), and checks that the loaded weights are a complete, finite EoMT."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from safetensors import SafetensorError
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


@contextlib.contextmanager
def readable_weight_errors(source: object) -> Iterator[None]:
    """A truncated or corrupt weight file raises an `OSError` naming it, and weights whose shapes do not fit the
    config a `ValueError` saying so, not the loader's internal errors."""
    try:
        yield
    except SafetensorError as error:
        raise OSError(
            f"The weights of {source} cannot be read ({error}): the file is truncated or corrupt. Download or copy "
            "the checkpoint again."
        ) from error
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ValueError(
            f"The weights of {source} do not fit its config.json (the load report above lists the tensors whose "
            "shapes differ): the config was edited or belongs to another checkpoint. Restore the matching "
            "config.json, or pass `ignore_mismatched_sizes=True` to start those tensors fresh on purpose."
        ) from error


def check_loaded(model: torch.nn.Module, info: dict, source: object, allow_missing: bool) -> None:
    """Refuse weights the checkpoint did not have (they would be random: a silently meaningless model) and
    non-finite weights (corrupt data)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing and not allow_missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ValueError(
            f"{source} has no weights for {shown}: it is not a complete EoMT checkpoint, and those weights would be "
            "random. To start them fresh on purpose pass `allow_missing_weights=True` (or start from a backbone "
            "with `from_backbone`)."
        )
    # One device read per device, not one per tensor; offloaded (meta) tensors are not checked.
    by_device: dict[torch.device, dict[str, torch.Tensor]] = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta:
            by_device.setdefault(tensor.device, {})[name] = torch.isfinite(tensor).all()
    broken = [name for flags in by_device.values() for name, ok in zip(flags, torch.stack([*flags.values()]).tolist())
              if not ok]  # fmt: skip
    if broken:
        raise ValueError(
            f"{source} holds NaN or infinite values in {', '.join(broken[:6])}: the weights are corrupt. Download "
            "or copy the checkpoint again."
        )
