"""ONNX export of EoMT: export time, file size, and onnxruntime's CPU forward against PyTorch eager (same weights).

    python benchmarks/bench_export.py [--size small] [--repeats 5] [--quick]

For information, no target: ViT-S at 640, float32, batch 1, 200 queries and 133 classes (COCO panoptic). onnxruntime
gets as many intra-op threads as torch has. Times are medians of interleaved repeats in process CPU time (all threads,
onnxruntime's included), with wall-clock medians next to them; export time is wall time of one unchecked export.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_model import interleaved_medians

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation
from modeling_eomt.export import INPUT_NAME, OUTPUT_NAMES, export_model

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "num_blocks": 1, "num_queries": 20,
        "num_labels": 10, "image_size": 64}  # fmt: skip


def time_export(repeats: int, config: EomtConfig) -> dict:
    """{"onnxruntime": Timing, "eager": Timing, "export_seconds": float, "file_mb": float} for a random model of
    `config` (batch 1 at its image size)."""
    import onnxruntime

    torch.manual_seed(0)
    model = EomtForUniversalSegmentation(config).eval()
    model.set_attn_mask_probs([0.0] * config.num_blocks)  # annealed, as in every released checkpoint
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = export_model(model, Path(folder) / "onnx", verify=False)
        export_seconds = time.perf_counter() - start
        file_mb = sum(f.stat().st_size for f in result.output_dir.glob(f"{result.file.name}*")) / 1e6
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(result.file), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: pixels.numpy()}
    calls = {"onnxruntime": lambda: session.run(list(OUTPUT_NAMES), feed), "eager": lambda: model(pixel_values=pixels)}
    with torch.inference_mode():
        seconds = interleaved_medians(calls, repeats)
    return {**seconds, "export_seconds": export_seconds, "file_mb": file_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=("small", "base", "large"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke test, numbers meaningless")
    args = parser.parse_args()
    if args.quick:
        config, setting = EomtConfig(**TINY), "tiny model, 64 px"
    else:
        config = EomtConfig.from_size(args.size, num_labels=133, num_queries=200, image_size=640)
        setting = f"ViT-{args.size[0].upper()} 640, float32, batch 1"
    result = time_export(args.repeats, config)
    ort, eager = result["onnxruntime"], result["eager"]
    print(f"{setting}: export {result['export_seconds']:.1f} s, model.onnx {result['file_mb']:.1f} MB")
    print(f"  forward CPU ms: onnxruntime {ort.cpu * 1e3:.1f}, PyTorch eager {eager.cpu * 1e3:.1f}")
    print(f"  onnxruntime / eager: {ort.cpu / eager.cpu:.2f} (CPU time), {ort.wall / eager.wall:.2f} (wall)")


if __name__ == "__main__":
    main()
