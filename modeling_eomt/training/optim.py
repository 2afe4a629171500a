"""The EoMT recipe's optimizer and learning-rate schedule, as pure functions of the model and the step.

AdamW (weight decay on every parameter) with layer-wise learning-rate decay: ViT block `i` of `L` trains at
`lr * layer_decay ** (L - 1 - i)` (the DINOv3 recipe keeps its masked blocks, the last ones, at `lr`), the embeddings (patch projection, position embeddings, CLS and register tokens)
at block 0's rate, the final norm, the queries and the heads at the full rate.

The schedule has two stages. The head (queries, class predictor, mask head, upscale blocks) warms up linearly from
step 0 over `head_warmup_steps`; the backbone (embeddings, blocks, final norm) stays at lr 0 for those steps, warms
up over the next `backbone_warmup_steps`; after its warmup each part decays as `(1 - progress) ** poly_power` to 0 at
the last step. The gradient-norm clip of the recipe (0.01) is `TrainingArguments.max_grad_norm`.

Use either `Trainer(..., optimizers=build_optimizer_and_scheduler(model, max_steps))` or [`EomtTrainer`]
(`trainer.py`), which builds them from [`EomtTrainingArguments`].
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

# Parameters of the ViT (everything else is "head"). The final norm belongs to the backbone, as in the original
# release: full lr, but it waits for the backbone's warmup.
_BLOCK_PATTERN = re.compile(r"^layers\.(\d+)\.")
_EMBEDDINGS_PREFIX = "embeddings."
_FINAL_NORM_PREFIX = "layernorm."
# Name components inserted by FSDP / activation-checkpointing wrappers.
_WRAPPER_COMPONENTS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def freeze_backbone(model: nn.Module) -> None:
    """Freeze the ViT (patch and position embeddings, CLS and register tokens, every block), so that training adapts
    the queries, the final norm, the class and mask heads and the upscale blocks only. The final norm stays trainable:
    it is the input of both heads, and cheap. Parameter names are those of the model (or of its wrappers)."""
    for name, param in unwrap_model(model).named_parameters():
        if name.startswith(_EMBEDDINGS_PREFIX) or _BLOCK_PATTERN.match(name):
            param.requires_grad_(False)


def layer_lr_scale(name: str, num_layers: int, layer_decay: float, full_lr_blocks: int = 0) -> float | None:
    """Learning-rate multiplier of the backbone parameter `name`, or `None` if `name` belongs to the head. The last
    `full_lr_blocks` blocks train at the full rate (the DINOv3 recipe's masked blocks)."""
    block = _BLOCK_PATTERN.match(name)
    if block is not None:
        index = int(block.group(1))
        return 1.0 if index >= num_layers - full_lr_blocks else layer_decay ** (num_layers - 1 - index)
    if name.startswith(_EMBEDDINGS_PREFIX):
        return layer_decay ** (num_layers - 1)
    if name.startswith(_FINAL_NORM_PREFIX):
        return 1.0
    return None


def parameter_groups(
    model: nn.Module,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    layer_decay: float = 0.8,
    full_lr_blocks: int = 0,
) -> list[dict]:
    """
    Split the trainable parameters of an EoMT model into AdamW parameter groups: one per ViT depth (embeddings share
    block 0's group) plus one for the head. Each group carries `lr`, `weight_decay`, `stage` (`"backbone"` or
    `"head"`, read by the scheduler) and a readable `name`. The last `full_lr_blocks` ViT blocks are left out of the
    layer decay. Under FSDP, wrap with `use_orig_params=True` so that
    the original parameters (and their names) are visible.
    """
    model = unwrap_model(model)
    named = [
        (_WRAPPER_COMPONENTS.sub("", name), param) for name, param in model.named_parameters() if param.requires_grad
    ]
    if not named:
        raise ValueError("The model has no trainable parameters; unfreeze some (`requires_grad_(True)`) to train.")
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if num_layers is None:
        blocks = [int(m.group(1)) for name, _ in named if (m := _BLOCK_PATTERN.match(name))]
        num_layers = max(blocks, default=-1) + 1

    groups: dict[tuple[str, float], dict] = {}
    for name, param in named:
        scale = layer_lr_scale(name, num_layers, layer_decay, full_lr_blocks)
        stage = "head" if scale is None else "backbone"
        scale = 1.0 if scale is None else scale
        group = groups.setdefault(
            (stage, scale),
            {"params": [], "lr": learning_rate * scale, "weight_decay": weight_decay, "stage": stage},
        )
        group["params"].append(param)
    if not any(stage == "backbone" for stage, _ in groups):
        raise ValueError(
            "Found no backbone parameters (`embeddings.*`, `layers.N.*`, `layernorm.*`); pass the EoMT model itself "
            "(e.g. `EomtForUniversalSegmentation`), not a sub-module."
        )
    result = []
    for (stage, scale), group in sorted(groups.items(), key=lambda item: (item[0][0] == "head", item[0][1])):
        group["name"] = f"{stage} x{scale:.4g}"
        result.append(group)
    return result


def two_stage_poly_factor(step: int, total_steps: int, delay_steps: int, warmup_steps: int, power: float) -> float:
    """
    Multiplier of the base learning rate at optimizer step `step` (0-based): 0 for `delay_steps`, a linear ramp over
    `warmup_steps`, then `(1 - progress) ** power` decaying to 0 at `total_steps`.
    """
    if step < delay_steps:
        return 0.0
    if step < delay_steps + warmup_steps:
        return (step - delay_steps) / warmup_steps
    decay_steps = max(1, total_steps - delay_steps - warmup_steps)
    progress = (step - delay_steps - warmup_steps) / decay_steps
    return max(0.0, 1.0 - progress) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    head_warmup_steps: int = 500,
    backbone_warmup_steps: int = 1000,
    poly_power: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    """
    The two-stage warmup + poly schedule as a `LambdaLR` stepped once per optimizer step. Groups whose `stage` is
    `"backbone"` start after the head's warmup; all other groups follow the head's schedule.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}; set `max_steps` or `num_train_epochs`.")
    lambdas = []
    for group in optimizer.param_groups:
        if group.get("stage") == "backbone":
            delay, warmup = head_warmup_steps, backbone_warmup_steps
        else:
            delay, warmup = 0, head_warmup_steps
        lambdas.append(
            partial(
                two_stage_poly_factor,
                total_steps=total_steps,
                delay_steps=delay,
                warmup_steps=warmup,
                power=poly_power,
            )
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def build_optimizer(
    model: nn.Module,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    layer_decay: float = 0.8,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    full_lr_blocks: int = 0,
) -> torch.optim.AdamW:
    """AdamW over [`parameter_groups`]."""
    groups = parameter_groups(model, learning_rate, weight_decay, layer_decay, full_lr_blocks)
    # The fused kernel: on CPU the per-tensor loop costs seconds per step at ViT-S (fused: ~0.1 s).
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)


def build_optimizer_and_scheduler(
    model: nn.Module,
    total_steps: int,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    layer_decay: float = 0.8,
    head_warmup_steps: int = 500,
    backbone_warmup_steps: int = 1000,
    poly_power: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    full_lr_blocks: int = 0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The recipe's `(optimizer, scheduler)` pair, ready for `Trainer(optimizers=...)`."""
    optimizer = build_optimizer(model, learning_rate, weight_decay, layer_decay, betas, eps, full_lr_blocks)
    return optimizer, build_scheduler(optimizer, total_steps, head_warmup_steps, backbone_warmup_steps, poly_power)
