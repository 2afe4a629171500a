"""Selective recompute: keep only matmul outputs for backward, redo the cheap memory-bound rest.

An option (`EomtForUniversalSegmentation.set_selective_recompute`), off by default; the plain computation is simply
calling the function. In an MLP it drops the activated hidden-width tensor for a few percent more compute.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

_KEEP_MATMUL_OUTPUTS = functools.partial(
    create_selective_checkpoint_contexts, [torch.ops.aten.addmm.default, torch.ops.aten.mm.default]
)


def recompute_all_but_matmuls(
    function: Callable[[torch.Tensor], torch.Tensor], hidden_states: torch.Tensor
) -> torch.Tensor:
    """`function(hidden_states)`, keeping for backward only the outputs of its matrix multiplications."""
    if not torch.is_grad_enabled():
        return function(hidden_states)
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device):
        # Autocast caches weight casts within its region (a second forward reuses them), so the recompute would cast
        # where the forward reused the cache; without the cache both make the same calls.
        function = functools.partial(_without_autocast_cache, function, device)
    return checkpoint(function, hidden_states, use_reentrant=False, context_fn=_KEEP_MATMUL_OUTPUTS)


def _without_autocast_cache(
    function: Callable[[torch.Tensor], torch.Tensor], device: str, hidden_states: torch.Tensor
) -> torch.Tensor:
    with torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False):
        return function(hidden_states)
