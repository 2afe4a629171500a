"""Forward and training-step speed of our EoMT vs a bare ViT with registers and vs transformers' built-in EoMT.

    python benchmarks/bench_model.py [--size small|base|large] [--batch 1] [--repeats 5]

Forward: ratios against the bare ViT (the floor: same width, depth and tokens, no queries or head) and against
the built-in, all measured in this process. Training step (forward with masked attention on, loss, backward,
fused AdamW step; batch 2, 20 target masks per image): time with both models in this process, their steps taking
turns; peak memory (max RSS) with each model in a fresh subprocess, so the peaks are comparable.

Times are process CPU time (all threads): on a shared machine other processes stretch wall time unevenly, while the
CPU work a forward needs stays put. Wall-clock medians of the same calls are reported next to them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from modeling_eomt import (
    EomtConfig,
    EomtDinov3Config,
    EomtDinov3ForUniversalSegmentation,
    EomtForUniversalSegmentation,
)

_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_blocks")
_FAMILY_FIELDS = {"dinov2": ("use_swiglu_ffn",), "dinov3": ("intermediate_size", "layer_norm_eps")}


def config_for(size: str, image_size: int, family: str = "dinov2") -> dict:
    """Architecture of a backbone size with 200 queries and 133 classes (COCO panoptic)."""
    config = (EomtDinov3Config if family == "dinov3" else EomtConfig).from_size(size)
    return {
        **{name: getattr(config, name) for name in _ARCH_FIELDS + _FAMILY_FIELDS[family]},
        "image_size": image_size,
        "num_queries": 200,
        "num_labels": 133,
    }


class Timing(NamedTuple):
    """Median seconds of a call: process CPU time (all threads) and wall-clock time."""

    cpu: float
    wall: float


def interleaved_medians(
    calls: dict[str, Callable[[], object]], repeats: int, warm_up: bool = True
) -> dict[str, Timing]:
    """Median CPU and wall seconds per call, after one warm-up each; the calls take turns so load changes hit all,
    in reversed order every other round (a call's page faults depend on what ran just before it)."""
    for call in calls.values() if warm_up else ():
        call()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for round_ in range(repeats):
        for name, call in list(calls.items())[:: -1 if round_ % 2 else 1]:
            cpu, wall = time.process_time(), time.perf_counter()
            call()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {name: Timing(*(statistics.median(column) for column in zip(*pairs))) for name, pairs in times.items()}


def build(kind: str, kwargs: dict) -> torch.nn.Module:
    """A model of `kwargs`' architecture: "ours", "builtin" or "bare_vit" (the floor: a plain ViT with registers of
    the same size), for the DINOv3 family when `kwargs` has `intermediate_size`."""
    dinov3 = "intermediate_size" in kwargs
    if kind == "ours":
        model = EomtDinov3ForUniversalSegmentation(EomtDinov3Config(**kwargs)) if dinov3 else (
            EomtForUniversalSegmentation(EomtConfig(**kwargs)))  # fmt: skip
        model.set_selective_recompute(True)  # as eomt-train runs it
    elif kind == "builtin" and dinov3:
        model = transformers.models.eomt_dinov3.EomtDinov3ForUniversalSegmentation(
            transformers.models.eomt_dinov3.EomtDinov3Config(**kwargs)
        )
    elif kind == "builtin":
        model = transformers.models.eomt.EomtForUniversalSegmentation(transformers.models.eomt.EomtConfig(**kwargs))
    elif dinov3:
        vit = {key: kwargs[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "intermediate_size", "image_size")}  # fmt: skip
        model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**vit, patch_size=16, num_register_tokens=4))
    else:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(
                hidden_size=kwargs["hidden_size"],
                num_hidden_layers=kwargs["num_hidden_layers"],
                num_attention_heads=kwargs["num_attention_heads"],
                image_size=kwargs["image_size"],
                patch_size=16,
                num_register_tokens=4,
                use_swiglu_ffn=kwargs.get("use_swiglu_ffn", False),
            )
        )
    if kind in ("ours", "builtin"):
        anneal(model)
    return model.eval()


def anneal(model: torch.nn.Module) -> None:
    """Masked attention off, as in every released checkpoint."""
    if hasattr(model, "set_attn_mask_probs"):
        model.set_attn_mask_probs([0.0] * model.config.num_blocks)
    else:
        model.attn_mask_probs.zero_()


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch counts the CUDA attention kernels but not the CPU one that SDPA dispatches to here.
_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def bench_forward(
    kwargs: dict, batch: int, repeats: int, extra: dict[str, torch.nn.Module] | None = None
) -> tuple[dict[str, Timing], dict[str, float]]:
    """Median forward time per model, and the forward's arithmetic (FLOPs of matmuls, convolutions and attention,
    counted by torch's FlopCounterMode during the warm-up call). Calls are interleaved so that load changes hit every
    model alike. `extra` models (e.g. another architecture taking `pixel_values` first) join the same loop.
    """
    pixels = torch.randn(batch, 3, kwargs["image_size"], kwargs["image_size"])
    models = {kind: build(kind, kwargs) for kind in ("bare_vit", "builtin", "ours")}
    models.update(extra or {})
    flops = {}
    with torch.inference_mode():
        for kind, model in models.items():
            with FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS) as counter:
                model(pixels)  # warm-up
            flops[kind] = float(counter.get_total_flops())
        calls = {kind: lambda model=model: model(pixels) for kind, model in models.items()}
        return interleaved_medians(calls, repeats, warm_up=False), flops


def bench_compiled(kwargs: dict, batch: int, repeats: int) -> dict[str, Timing]:
    """Median forward time of ours and the built-in, each under `torch.compile` (inductor; the built-in compiles
    with graph breaks at its data-dependent branches), after compiling."""
    pixels = torch.randn(batch, 3, kwargs["image_size"], kwargs["image_size"])
    torch._dynamo.reset()
    models = {kind: torch.compile(build(kind, kwargs)) for kind in ("builtin", "ours")}
    with torch.inference_mode():
        calls = {kind: lambda model=model: model(pixels) for kind, model in models.items()}
        return interleaved_medians(calls, repeats)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak_rss() -> float:
    """Restart the process's peak-RSS count (Linux) and return the resident MB now, the floor of later peaks."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS:")


def peak_rss() -> float:
    """Peak resident MB since the process started or since the last `reset_peak_rss`."""
    return _status_mb("VmHWM:")


class TrainStep:
    """One training step of a model of `kwargs`' architecture ("ours" or "builtin"), called without arguments: forward
    with masked attention on (as early in training) and labels, backward, fused AdamW step. Batch 2, 20 target masks
    per image; the same data for every model."""

    def __init__(self, kind: str, kwargs: dict) -> None:
        torch.manual_seed(0)
        self.model = build(kind, kwargs)
        self.model.attn_mask_probs.fill_(1.0)
        self.model.train()  # after the fill: `train()` re-reads which blocks mask
        size = kwargs["image_size"]
        self.pixels = torch.randn(2, 3, size, size)
        self.mask_labels = [
            (torch.rand(20, size // 32, size // 32) > 0.5).repeat_interleave(32, 1).repeat_interleave(32, 2).float()
            for _ in range(2)
        ]
        self.class_labels = [torch.randint(0, kwargs["num_labels"], (20,)) for _ in range(2)]
        # The fused kernel (the Trainer's default "adamw_torch_fused"): torch's per-tensor AdamW takes seconds per
        # step on CPU at ViT-S, an identical cost for both models that would hide their difference.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)

    def __call__(self) -> None:
        out = self.model(self.pixels, mask_labels=self.mask_labels, class_labels=self.class_labels)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def train_memory_child(kind: str, kwargs: dict) -> None:
    """Run in a subprocess: two training steps; report, as JSON on stdout, the peak RSS (imports included) and the
    part of it added by the model, its optimizer and the steps (peak minus the resident memory after imports)."""
    peak_with_imports = peak_rss()
    floor = reset_peak_rss()
    step = TrainStep(kind, kwargs)
    step()
    step()  # the optimizer's state exists from the first step on
    peak = peak_rss()
    print(json.dumps({"peak_mb": max(peak, peak_with_imports), "added_mb": peak - floor}))


def bench_train(kwargs: dict, steps: int) -> dict[str, dict]:
    """Training-step time of ours and the built-in (median of `steps` steps each after a warm-up, both models in this
    process, taking turns so load changes hit both) and peak memory (each in a fresh subprocess)."""
    timings = interleaved_medians({kind: TrainStep(kind, kwargs) for kind in ("builtin", "ours")}, steps)
    results = {}
    for kind, timing in timings.items():
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--kwargs", json.dumps(kwargs)],
            check=True,
            capture_output=True,
            text=True,
        )
        results[kind] = {"seconds": timing.cpu, "wall_seconds": timing.wall,
                         **json.loads(out.stdout.strip().splitlines()[-1])}  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["small", "base", "large"])
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return train_memory_child(args.child, json.loads(args.kwargs))

    kwargs = config_for(args.size, args.image_size)
    forward, flops = bench_forward(kwargs, args.batch, args.repeats)
    print(f"forward, ViT-{args.size[0].upper()} {args.image_size}, batch {args.batch}, 200 queries, 133 classes")
    forward = {kind: timing.cpu for kind, timing in forward.items()}
    print(f"  ours / bare ViT : {forward['ours'] / forward['bare_vit']:.3f}  (floor: the FLOP ratio below)")
    print(
        f"  FLOPs ours / bare ViT: {flops['ours'] / flops['bare_vit']:.3f}  (the time ratio's floor at equal efficiency)"
    )
    per_flop = (forward["ours"] / flops["ours"]) / (forward["bare_vit"] / flops["bare_vit"])
    print(f"  time per FLOP ours / bare ViT: {per_flop:.3f}  (target ≤ 1.03)")
    print(f"  ours / built-in : {forward['ours'] / forward['builtin']:.3f}  (target ≤ 1.00)")
    print(f"  built-in / bare : {forward['builtin'] / forward['bare_vit']:.3f}")
    print("  CPU ms: " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in forward.items()))
    if args.skip_train:
        return
    train = bench_train(kwargs, max(2, args.repeats // 2))
    print(f"training step, ViT-{args.size[0].upper()} {args.image_size}, batch 2, 20 masks per image")
    print(f"  time ours / built-in : {train['ours']['seconds'] / train['builtin']['seconds']:.3f}  (target ≤ 0.7)")
    print(f"  peak ours / built-in : {train['ours']['peak_mb'] / train['builtin']['peak_mb']:.3f}  (target ≤ 0.7)")
    print(f"  added ours / built-in: {train['ours']['added_mb'] / train['builtin']['added_mb']:.3f}  (above imports)")
    print("  " + ", ".join(f"{k} {v['seconds']:.2f} CPU s, peak {v['peak_mb']:.0f} MB, added {v['added_mb']:.0f} MB"
                           for k, v in train.items()))  # fmt: skip


if __name__ == "__main__":
    main()
