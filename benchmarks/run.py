"""The benchmark suite behind `make bench`: our EoMT side by side with its baselines, all measured in one run on CPU.

    python benchmarks/run.py [--large] [--repeats 5] [--quick] [--output benchmarks/results]

- model forward: ours vs a bare ViT with registers of the same size (the floor, also per FLOP) vs transformers'
  built-in EoMT, ViT-S and ViT-B at 640 (ViT-L with --large), batch 1 and 4; Mask2Former (Swin-T) at 640 as the
  alternative; DINOv3 ViT-S/B vs the built-in `eomt_dinov3` and a bare DINOv3 ViT; compiled ours vs compiled built-in;
- post-processing (panoptic, instance, semantic) and image → panoptic segments vs the built-in processor;
- one training step (forward, matching, loss, backward, AdamW) vs the built-in, ViT-S 640, batch 2;
- peak memory of inference and of a training step, one fresh subprocess per model so peaks are comparable;
- peak memory of `eomt segment` on a large image (tiny model) against its int64 segment map, step by step;
- ONNX export: onnxruntime vs PyTorch eager forward, export time, file size;
- fine-tuning from a pretrained (shapes-pretrained, DINOv2-format) backbone vs from random weights: PQ curves.

Writes `benchmarks.md` (ratios first, absolute numbers second, targets and whether they are met), `benchmarks.png`
and the raw `benchmarks.json` to the output folder. Times are medians of interleaved repeats in process CPU time
(all threads), which other processes on a shared machine stretch far less than wall time; targets are judged on it.
The wall-clock ratio of the same calls is given too. `--quick` runs tiny models for a smoke test; its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from bench_export import time_export
from bench_model import (
    Timing,
    bench_compiled,
    bench_forward,
    bench_train,
    build,
    config_for,
    peak_rss,
    reset_peak_rss,
)
from bench_postprocess import SEGMENT_SIDE, SEGMENT_STEPS, segment_memory, time_end_to_end, time_post_processing
from bench_postprocess import TARGETS as POST_TARGETS
from tqdm import tqdm

from modeling_eomt import EomtConfig

# --quick: a few-layer model whose forward takes milliseconds; post-processing at a small scale
TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "num_blocks": 1, "use_swiglu_ffn": False,
        "num_queries": 20, "num_labels": 10, "train_num_points": 256}  # fmt: skip
TINY_POST = {"queries": 20, "classes": 10, "grid": 32, "target": (48, 64), "confident": 5}
MODELS = {"ours": "ours", "bare_vit": "bare ViT", "builtin": "built-in", "mask2former": "Mask2Former Swin-T"}
PALETTE = {"ours": "tab:blue", "bare_vit": "0.55", "builtin": "tab:orange", "mask2former": "tab:purple"}


@dataclass
class Row:
    """One comparison: ours against a baseline; `target` is the largest acceptable ratio (None: for information)."""

    benchmark: str
    setting: str
    ours: float
    baseline: float
    baseline_name: str
    unit: str
    target: float | None = None
    wall_ratio: float | None = None  # time rows: the same ratio in wall-clock time

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


def time_row(
    benchmark: str, setting: str, ours: Timing, baseline: Timing, baseline_name: str, target: float | None = None
) -> Row:
    """A time comparison in CPU milliseconds, with its wall-clock ratio."""
    return Row(benchmark, setting, ours.cpu * 1e3, baseline.cpu * 1e3, baseline_name, "ms", target,
               ours.wall / baseline.wall)  # fmt: skip


def mask2former(image_size: int, quick: bool) -> torch.nn.Module:
    """Mask2Former with a Swin-T backbone (random weights) as in `facebook/mask2former-swin-tiny-coco-panoptic`."""
    if quick:
        swin = transformers.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                       image_size=image_size, out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
        sizes = {"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "encoder_feedforward_dim": 64,
                 "encoder_layers": 1, "decoder_layers": 2, "dim_feedforward": 64, "num_attention_heads": 2}  # fmt: skip
    else:
        swin = transformers.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                                       image_size=image_size, out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
        sizes = {}
    config = transformers.Mask2FormerConfig(backbone_config=swin, num_labels=TINY["num_labels"] if quick else 133,
                                            num_queries=TINY["num_queries"] if quick else 100, **sizes)  # fmt: skip
    torch.manual_seed(0)
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


def inference_memory_child(kind: str, kwargs: dict, batch: int, quick: bool) -> None:
    """Run in a subprocess: two forwards of a fresh model; report, as JSON on stdout, the process's peak RSS and the
    part of it added by the model and its forwards (peak minus the resident memory after imports)."""
    peak_with_imports = peak_rss()
    floor = reset_peak_rss()
    size = kwargs["image_size"]
    torch.manual_seed(0)
    model = mask2former(size, quick) if kind == "mask2former" else build(kind, kwargs)
    pixels = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(pixels)
        model(pixels)
    peak = peak_rss()
    print(json.dumps({"peak_mb": max(peak, peak_with_imports), "added_mb": peak - floor}))


# glibc returns allocations above this size to the OS as soon as they are freed, so that peak RSS follows the peak of
# live tensors; with the default (a threshold that grows to 32 MB) the same forward's peak moved by ±10 % between runs
# with the heap's fragmentation. Inference only: for the training step it would also slow the timed code.
_EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def inference_memory(kinds: list[str], kwargs: dict, batch: int, quick: bool) -> dict[str, dict[str, float]]:
    peaks = {}
    for kind in kinds:
        command = [sys.executable, __file__, "--child", kind, "--kwargs", json.dumps(kwargs), "--batch", str(batch)]
        out = subprocess.run(
            command + ["--quick"] * quick, check=True, capture_output=True, text=True, env={**os.environ, **_EXACT_RSS}
        )
        peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    return peaks


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def run_all(args: argparse.Namespace) -> dict:
    """Every measurement, as {"rows": [Row], "absolute": {setting: {model: value}}} plus the run's context."""
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        sizes = {"tiny": {**TINY, "image_size": 64}}
        batches = (1, 2)
    else:
        names = ["small", "base"] + ["large"] * args.large
        sizes = {f"ViT-{name[0].upper()}": config_for(name, 640) for name in names}
        batches = (1, 4)
    size_640 = "64 px" if args.quick else "640"
    small_name, small = next(iter(sizes.items()))
    rows: list[Row] = []
    absolute: dict[str, dict[str, float]] = {}

    def forward(name: str, kwargs: dict, batch: int) -> None:
        dinov3 = "intermediate_size" in kwargs
        extra = {"mask2former": mask2former(kwargs["image_size"], args.quick)} if batch == 1 and not dinov3 else None
        seconds, flops = bench_forward(kwargs, batch, repeats, extra)
        setting = f"{name} {size_640}, batch {batch}"
        if dinov3:
            absolute[f"forward ms, {setting}"] = {kind: s.cpu * 1e3 for kind, s in seconds.items()}
            rows.append(time_row("DINOv3 forward vs built-in eomt_dinov3", setting, seconds["ours"],
                                 seconds["builtin"], "built-in", 1.0))  # fmt: skip
            rows.append(time_row("DINOv3 forward vs bare DINOv3 ViT", setting, seconds["ours"], seconds["bare_vit"],
                                 "bare ViT"))  # fmt: skip
            return
        # Time per FLOP against the bare ViT's: what our forward costs beyond its extra arithmetic.
        per_flop = {kind: Timing(t.cpu / flops[kind], t.wall / flops[kind]) for kind, t in seconds.items()}
        rows.append(Row("forward time per FLOP vs bare ViT", setting, per_flop["ours"].cpu * 1e12,
                        per_flop["bare_vit"].cpu * 1e12, "bare ViT", "ms/TFLOP", 1.03,
                        per_flop["ours"].wall / per_flop["bare_vit"].wall))  # fmt: skip
        absolute[f"forward ms, {setting}"] = {kind: s.cpu * 1e3 for kind, s in seconds.items()}
        absolute[f"arithmetic GFLOP, {setting}"] = {kind: f / 1e9 for kind, f in flops.items()}
        if batch == 1:  # the arithmetic scales with the batch: one row per backbone size
            rows.append(Row("arithmetic vs bare ViT (FLOPs)", setting, flops["ours"] / 1e9, flops["bare_vit"] / 1e9,
                            "bare ViT", "GFLOP"))  # fmt: skip
        # No target: the extra arithmetic alone (queries and head) is ~1.17× the bare ViT's; the per-FLOP row judges.
        rows.append(time_row("forward vs bare ViT", setting, seconds["ours"], seconds["bare_vit"], "bare ViT"))
        rows.append(time_row("forward vs built-in", setting, seconds["ours"], seconds["builtin"], "built-in", 1.0))
        if extra:
            rows.append(time_row("forward vs Mask2Former Swin-T", setting, seconds["ours"], seconds["mask2former"],
                                 "Mask2Former"))  # fmt: skip

    def compiled() -> None:
        seconds = bench_compiled(small, 1, repeats)
        setting = f"{small_name} {size_640}, batch 1, torch.compile"
        rows.append(time_row("compiled forward vs compiled built-in", setting, seconds["ours"], seconds["builtin"],
                             "built-in"))  # fmt: skip

    def post_processing() -> None:
        sizes_post = TINY_POST if args.quick else {}
        setting = "20 queries, 32² masks → 48×64" if args.quick else "200 queries, 160² masks → 480×640"
        for task, seconds in time_post_processing(repeats, **sizes_post).items():
            rows.append(time_row(f"{task} post-processing", setting, seconds["ours"], seconds["builtin"], "built-in",
                                 POST_TARGETS[task]))  # fmt: skip
        # Where pruning helps little: many confident queries, noise masks.
        noisy = {**sizes_post, "confident": sizes_post.get("queries", 150), "noisy": True}
        seconds = time_post_processing(repeats, tasks=("semantic",), **noisy)["semantic"]
        rows.append(time_row("semantic post-processing, noisy", setting, seconds["ours"], seconds["builtin"],
                             "built-in", POST_TARGETS["semantic"]))  # fmt: skip

    def end_to_end() -> None:
        if args.quick:
            config = EomtConfig(**{**TINY, "image_size": 640})
            setting = "tiny model, 480×640 image"
        else:
            config = EomtConfig.from_size("small", num_labels=133, num_queries=200, image_size=640)
            setting = "ViT-S 640, 480×640 image, panoptic"
        seconds = time_end_to_end(repeats, config)
        rows.append(time_row("end to end (image → segments)", setting, seconds["ours"]["end_to_end"],
                             seconds["builtin"]["end_to_end"], "built-in", 0.8))  # fmt: skip

    def training() -> None:
        result = bench_train(small, 1 if args.quick else 5)
        setting = f"{small_name} {size_640}, batch 2"
        absolute[f"training step ms, {setting}"] = {k: v["seconds"] * 1e3 for k, v in result.items()}
        absolute[f"training step peak MB (with imports), {setting}"] = {k: v["peak_mb"] for k, v in result.items()}
        ours, builtin = (Timing(result[kind]["seconds"], result[kind]["wall_seconds"]) for kind in ("ours", "builtin"))
        rows.append(time_row("training step time", setting, ours, builtin, "built-in", 0.7))
        rows.append(Row("training step peak memory", setting, result["ours"]["added_mb"], result["builtin"]["added_mb"],
                        "built-in", "MB", 0.7))  # fmt: skip

    def memory(batch: int) -> None:
        kinds = ["ours", "builtin"] if args.quick else ["ours", "builtin", "bare_vit"] + ["mask2former"] * (batch == 1)
        peaks = inference_memory(kinds, small, batch, args.quick)
        setting = f"{small_name} {size_640}, batch {batch}"
        absolute[f"inference peak MB (with imports), {setting}"] = {k: v["peak_mb"] for k, v in peaks.items()}
        rows.append(Row("inference peak memory", setting, peaks["ours"]["added_mb"], peaks["builtin"]["added_mb"],
                        "built-in", "MB", 1.0))  # fmt: skip

    stages = [(f"forward {name} batch {batch}", lambda n=name, k=kwargs, b=batch: forward(n, k, b))
              for name, kwargs in sizes.items() for batch in batches]  # fmt: skip
    dinov3_sizes = {"tiny DINOv3": {**{k: v for k, v in TINY.items() if k != "use_swiglu_ffn"},
                                     "image_size": 64, "intermediate_size": 64}} if args.quick else {
        f"ViT-{name[0].upper()} DINOv3": config_for(name, 640, "dinov3") for name in ("small", "base")}  # fmt: skip
    stages += [(f"forward {name}", lambda n=name, k=kwargs: forward(n, k, 1)) for name, kwargs in dinov3_sizes.items()]
    stages += [("compiled forward", compiled), ("post-processing", post_processing), ("end to end", end_to_end)]
    stages += [("training step", training)]
    # the quick run keeps subprocesses (seconds of imports each) to a minimum
    stages += [(f"inference memory batch {b}", lambda b=b: memory(b)) for b in batches[: 1 if args.quick else None]]

    def segment_peak_memory() -> None:
        side = 1000 if args.quick else SEGMENT_SIDE
        result = segment_memory(side)
        # The peak against the int64 segment map the command cannot avoid (bounded: ≤ 2.5×, see bench_postprocess),
        # and in the absolute table the peak of each step; all above the RSS after imports and model.
        setting = f"`eomt segment`, tiny panoptic model, {side}×{side} image"
        rows.append(Row("eomt segment peak memory vs its segment map", setting, result["peak"], result["output"],
                        "int64 segment map", "MB", 2.5))  # fmt: skip
        for name in SEGMENT_STEPS:
            absolute[f"{setting}: peak MB while {name}"] = {"ours": result[name]}

    stages += [("eomt segment memory", segment_peak_memory)]

    def onnx_export() -> None:
        config = (EomtConfig(**{**TINY, "image_size": 64}) if args.quick
                  else EomtConfig.from_size("small", num_labels=133, num_queries=200, image_size=640))  # fmt: skip
        setting = "tiny model, 64 px" if args.quick else "ViT-S 640, float32, batch 1"
        result = time_export(repeats, config)
        rows.append(time_row("onnxruntime forward vs eager", setting, result["onnxruntime"], result["eager"],
                             "PyTorch eager"))  # fmt: skip
        absolute[f"ONNX export s, {setting}"] = {"ours": result["export_seconds"]}
        absolute[f"ONNX file MB, {setting}"] = {"ours": result["file_mb"]}

    stages += [("onnx export", onnx_export)]

    def pretrained_start() -> None:
        from bench_backbone import compare_starts, plot_curves  # keeps the Trainer's imports out of other stages

        result = compare_starts(args.quick)
        plot_curves(result, args.output / "backbone_pq.png")
        step = result["steps"]
        pretrained, random = (100 * (1 - result["curves"][name][step]) for name in ("pretrained", "random"))
        seeds = len(result["runs"]["random"])
        leads = ", ".join(str(at) for at, lead in result["clear_lead"].items() if lead) or "none"
        setting = (f"demo EoMT on shapes, 100 − PQ after {step} steps on {result['train_images']} images, mean of "
                   f"{seeds} seeds; target: a tenth less error; every pretrained seed above every random "
                   f"seed at steps: {leads} (backbone_pq.png)")  # fmt: skip
        rows.append(
            Row("pretrained start vs random start", setting, pretrained, random, "random start", "PQ pts", 0.9)
        )

    stages += [("pretrained start", pretrained_start)]
    start_load = load_average()
    started = datetime.datetime.now(datetime.timezone.utc)
    progress = tqdm(stages, desc="benchmarks", unit="stage")
    for label, stage in progress:
        progress.set_postfix_str(label)
        stage()
    return {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average": {"start": start_load, "end": load_average()},
        "repeats": repeats,
        "quick": args.quick,
        "rows": rows,
        "absolute": absolute,
    }


def _number(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"


def markdown(results: dict) -> str:
    m, load = results["machine"], results["load_average"]
    lines = [
        "# EoMT benchmarks (CPU)" + (" — quick smoke run, numbers meaningless" if results["quick"] else ""),
        "",
        (
            f"Measured {results['date']} on {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); "
            f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}. Load average (1/5/15 min) "
            f"{load['start']} at the start, {load['end']} at the end: the machine is shared with other processes."
        ),
        "",
        (
            "Random weights, float32, COCO panoptic heads (200 queries, 133 classes; Mask2Former: 100 queries). "
            f"Times are process CPU time (all threads), median of {results['repeats']} interleaved repeats after a "
            "warm-up; targets are judged on them. The wall ratio is the same comparison in wall-clock time, where "
            "work spread over both cores counts once. Memory is measured in a fresh subprocess per model: the ratio "
            "compares the peak resident memory added by the model and its work (peak RSS minus the RSS after imports, "
            "about the same for every model); "
            "the absolute table also gives whole-process peaks. Inference children run with glibc's "
            "`MALLOC_MMAP_THRESHOLD_=65536`, so that freed tensors leave at once and the peak follows live tensors "
            "rather than heap fragmentation. Arithmetic counts the FLOPs of matmuls, convolutions "
            "and attention (torch's FlopCounterMode): at equal efficiency it is the floor of the forward time ratio. "
            "Ratio = ours / baseline; lower is better. Reproduce with `make bench`."
        ),
        "",
        "| Benchmark | Setting | Ratio | Target | Met | Wall ratio | Ours | Baseline |",
        "|---|---|---:|---:|:---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        target = "—" if row.target is None else f"≤ {row.target:.2f}"
        met = {None: "", True: "yes", False: "**no**"}[row.met]
        wall = "—" if row.wall_ratio is None else f"{row.wall_ratio:.2f}"
        lines.append(
            f"| {row.benchmark} | {row.setting} | {row.ratio:.2f} | {target} | {met} | {wall} | "
            f"{_number(row.ours, row.unit)} | {_number(row.baseline, row.unit)} ({row.baseline_name}) |"
        )
    kinds = [k for k in MODELS if any(k in values for values in results["absolute"].values())]
    lines += ["", "Absolute numbers:", "", "| Measurement | " + " | ".join(MODELS[k] for k in kinds) + " |",
              "|---|" + "---:|" * len(kinds)]  # fmt: skip
    for name, values in results["absolute"].items():
        cells = [f"{values[k]:,.0f}" if values.get(k, 0) >= 100 else f"{values[k]:.1f}" if k in values else "—"
                 for k in kinds]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    forwards = {k: v for k, v in results["absolute"].items() if k.startswith("forward")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 0.45 * len(rows) + 2), gridspec_kw={"width_ratios": [3, 2]})
    colors = {None: "0.6", True: "tab:green", False: "tab:red"}
    y = range(len(rows))[::-1]
    left.barh(y, [r.ratio for r in rows], color=[colors[r.met] for r in rows])
    for yi, row in zip(y, rows):
        if row.target is not None:
            left.plot([row.target] * 2, [yi - 0.4, yi + 0.4], color="black", lw=2)
        left.text(row.ratio, yi, f" {row.ratio:.2f}", va="center", fontsize=8)
    left.set_yticks(list(y), [f"{r.benchmark}\n{r.setting}" for r in rows], fontsize=7)
    left.axvline(1.0, color="0.3", ls=":", lw=1)
    left.set_xlabel("ours / baseline (lower is better; black tick = target; green met, red missed, grey info)")
    left.set_title("Ratios")
    kinds = [k for k in MODELS if any(k in v for v in forwards.values())]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        xs = [j + i * width for j, v in enumerate(forwards.values()) if kind in v]
        values = [v[kind] for v in forwards.values() if kind in v]
        right.bar(xs, values, width, label=MODELS[kind], color=PALETTE[kind])
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(forwards))],
                     [k.removeprefix("forward ms, ") for k in forwards], rotation=20, ha="right", fontsize=8)  # fmt: skip
    right.set_ylabel("forward, CPU ms (log)")
    right.set_yscale("log")
    right.legend(fontsize=8)
    right.set_title("Forward time")
    fig.suptitle(f"EoMT on CPU — {results['date']}, {results['machine']['cpu']}, {results['machine']['cores']} cores")
    fig.tight_layout()
    with _atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


class _atomic:
    """A temporary path next to `path`, renamed onto it when the block succeeds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write(results: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with _atomic(output / "benchmarks.md") as tmp:
        tmp.write_text(markdown(results))
    with _atomic(output / "benchmarks.json") as tmp:
        raw = {**results, "rows": [{**asdict(r), "ratio": r.ratio, "met": r.met} for r in results["rows"]]}
        tmp.write_text(json.dumps(raw, indent=1) + "\n")
    plot(results, output / "benchmarks.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="Also time the ViT-L forward (slow on CPU).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats per measurement (after a warm-up).")
    parser.add_argument("--quick", action="store_true", help="Tiny models and one repeat: a smoke test.")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}.")
    if args.child:
        return inference_memory_child(args.child, json.loads(args.kwargs), args.batch, args.quick)
    results = run_all(args)
    write(results, args.output)
    print(markdown(results))
    print(f"written to {args.output}/benchmarks.md, .png and .json")


if __name__ == "__main__":
    main()
