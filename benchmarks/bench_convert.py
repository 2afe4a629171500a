"""Time and peak memory of converting a random original-release checkpoint (default: EoMT-L at 640, ~1.3 GB).

    python benchmarks/bench_convert.py [--size large] [--image-size 640] [--skip-verify-run] [--dinov3]

`--dinov3` converts a DINOv3 delta checkpoint instead, with a random DINOv3 base backbone of the same size in
transformers' format (loading the base and adding it to the deltas is the extra work).

Baseline, measured in the same run: the least any converter must do — load the whole checkpoint into memory and
write every tensor to safetensors. Our conversion (with and without the logit check) runs in fresh subprocesses,
like the baseline, and is reported as ratios against it. Memory: peak RSS (includes pages of the memory-mapped
input, which the kernel can drop) and peak anonymous RSS (memory the process really owns), sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from modeling_eomt.configuration import DINOV3_SIZES, SIZES
from test_convert import original_config, original_state_dict  # the tests' checkpoint builders
from test_convert_dinov3 import delta_state_dict, save_base

CHILD = r"""
import json, sys, threading, time
from pathlib import Path

peak = {"anon": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()

mode, source, output, options = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
start = time.perf_counter()
difference = None
if mode == "baseline":
    import torch
    from safetensors.torch import save_file
    state_dict = torch.load(source / "pytorch_model.bin", map_location="cpu", weights_only=True)
    output.mkdir()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, output / "model.safetensors")
else:
    from modeling_eomt.convert import convert_checkpoint
    result = convert_checkpoint(source, output, verify=mode == "verify", progress=False, **options)
    difference = result.max_abs_difference
seconds = time.perf_counter() - start
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": hwm, "peak_anon": peak["anon"], "difference": difference}))
"""


def run(mode: str, source: Path, output: Path, options: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(source), str(output), json.dumps(options)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="large", choices=list(SIZES))
    parser.add_argument("--dinov3", action="store_true", help="A DINOv3 delta checkpoint (small, base or large).")
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--skip-verify-run", action="store_true", help="Only time the conversion without the check.")
    args = parser.parse_args()
    if args.dinov3 and args.size not in DINOV3_SIZES:
        parser.error(f"--dinov3 sizes are {', '.join(DINOV3_SIZES)}")

    size = (DINOV3_SIZES if args.dinov3 else SIZES)[args.size]
    arch = {
        "num_blocks": size["num_blocks"],
        "num_queries": 200,
        "num_labels": 133,
    }
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as work:
        work = Path(work)
        start = time.perf_counter()
        folder = work / "original"
        folder.mkdir()
        options: dict = {}
        if args.dinov3:
            base = save_base(
                work / "base",
                hidden_size=size["hidden_size"],
                num_hidden_layers=size["num_hidden_layers"],
                num_attention_heads=size["num_attention_heads"],
                intermediate_size=size["intermediate_size"],
                image_size=args.image_size,
            )
            state_dict = delta_state_dict(base, **arch)
            del base
            options = {"base_backbone": str(work / "base"), "image_size": args.image_size}
        else:
            arch |= {k: size[k] for k in ("hidden_size", "num_hidden_layers")} | {"image_size": args.image_size}
            state_dict = original_state_dict(**arch, swiglu=size.get("use_swiglu_ffn", False))
            (folder / "config.json").write_text(json.dumps(original_config(args.size, **arch)))
        torch.save(state_dict, folder / "pytorch_model.bin")
        gigabytes = sum(t.numel() * t.element_size() for t in state_dict.values()) / 1e9
        del state_dict
        print(
            f"random {args.size}-{args.image_size}{' DINOv3 delta' if args.dinov3 else ''} checkpoint: "
            f"{gigabytes:.2f} GB, built in {time.perf_counter() - start:.1f} s"
        )

        rows = [("baseline (load all + save)", run("baseline", folder, work / "baseline", options))]
        rows.append(("convert --no-verify", run("convert", folder, work / "converted", options)))
        if not args.skip_verify_run:
            rows.append(("convert (verified)", run("verify", folder, work / "verified", options)))

    base = rows[0][1]
    header = (
        f"{'run':28} {'time s':>8} {'×base':>6} {'peak RSS GB':>12} {'×base':>6} {'peak anon GB':>13} {'×base':>6}"
    )
    print(header)
    for name, row in rows:
        print(
            f"{name:28} {row['seconds']:8.1f} {row['seconds'] / base['seconds']:6.2f} "
            f"{row['peak_rss'] / 1e9:12.2f} {row['peak_rss'] / base['peak_rss']:6.2f} "
            f"{row['peak_anon'] / 1e9:13.2f} {row['peak_anon'] / base['peak_anon']:6.2f}"
            + (f"   max |Δlogit| {row['difference']:.1e}" if row["difference"] is not None else "")
        )
    print(
        f"peak anonymous memory of {rows[-1][0]}: {rows[-1][1]['peak_anon'] / 1e9 / gigabytes:.2f}× "
        "the checkpoint size"
    )


if __name__ == "__main__":
    main()
