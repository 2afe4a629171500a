"""Post-processing and image → panoptic speed of EomtImageProcessor against transformers' built-in EoMT processor,
measured in the same run, plus the memory that post-processing a 3000×1500 image adds.

    python benchmarks/bench_postprocess.py [--repeats 5] [--model-size small]

Targets (issue 3): each post-processing ≤ 0.2× the built-in's time at 200 queries, 160×160 masks, 133 classes and
a 480×640 target; image → panoptic segments ≤ 0.7× end to end; a 3000×1500 post-processing adds well under 1 GB.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch

QUERIES, CLASSES, GRID, TARGET = 200, 133, 160, (480, 640)
SIZE = {"shortest_edge": 640, "longest_edge": 640}


def fake_outputs(confident: int = 30, seed: int = 0, target=TARGET) -> SimpleNamespace:
    """COCO-like outputs: `confident` queries with a clear class and a blob-shaped mask, the rest "no object"."""
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(1, QUERIES, CLASSES + 1, generator=g)
    class_logits[..., -1] += 4
    mask_logits = torch.randn(1, QUERIES, GRID, GRID, generator=g) - 4
    # mask area of the image content inside the padded canvas
    rows = GRID * min(1.0, target[0] / target[1])
    cols = GRID * min(1.0, target[1] / target[0])
    for q in range(confident):
        class_logits[0, q, torch.randint(0, CLASSES, (), generator=g)] += 12
        top, left = int(torch.rand((), generator=g) * rows * 0.7), int(torch.rand((), generator=g) * cols * 0.7)
        mask_logits[0, q, top : top + int(rows * 0.3), left : left + int(cols * 0.3)] += 10
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits, patch_offsets=None)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name: str, ours: float, builtin: float, target: float) -> None:
    ratio = ours / builtin
    verdict = "ok" if ratio <= target else "MISSED"
    print(f"{name:<28} ours {ours * 1e3:8.1f} ms  built-in {builtin * 1e3:8.1f} ms  ratio {ratio:5.2f}  "
          f"(target ≤ {target}: {verdict})")  # fmt: skip


def bench_post_processing(repeats: int) -> None:
    from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

    from modeling_eomt import EomtImageProcessor

    ours, builtin = EomtImageProcessor(size=SIZE), EomtImageProcessorPil(size=SIZE, do_pad=True)
    outputs, sizes = fake_outputs(), [TARGET]
    kept = int((outputs.class_queries_logits.softmax(-1).max(-1).values > 0.8).sum())
    print(f"post-processing: {QUERIES} queries ({kept} above 0.8), {GRID}×{GRID} masks, {CLASSES} classes, "
          f"target {TARGET[0]}×{TARGET[1]}")  # fmt: skip
    for task in ("panoptic", "instance", "semantic"):
        name = f"post_process_{task}_segmentation"
        a = best_time(lambda: getattr(ours, name)(outputs, sizes), repeats)
        b = best_time(lambda: getattr(builtin, name)(outputs, target_sizes=sizes), repeats)
        report(f"{task} post-processing", a, b, 0.2)


def bench_end_to_end(repeats: int, model_size: str) -> None:
    import transformers
    from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

    from modeling_eomt import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor

    config = EomtConfig.from_size(model_size, num_labels=CLASSES, num_queries=QUERIES, image_size=640)
    torch.manual_seed(0)
    model = EomtForUniversalSegmentation(config).eval()
    builtin_model = transformers.EomtForUniversalSegmentation(transformers.EomtConfig(**config.to_dict())).eval()
    builtin_model.load_state_dict(model.state_dict(), strict=False)
    image = np.random.default_rng(0).integers(0, 256, (*TARGET, 3), dtype=np.uint8)
    ours, builtin = EomtImageProcessor(size=SIZE), EomtImageProcessorPil(size=SIZE, do_pad=True)

    @torch.inference_mode()
    def run(processor, net, **kwargs):
        inputs = processor(images=[image], return_tensors="pt")
        outputs = net(pixel_values=inputs["pixel_values"])
        return processor.post_process_panoptic_segmentation(outputs, target_sizes=[TARGET], **kwargs)

    print(f"\nimage → panoptic segments, EoMT-{model_size} structure (random weights), 480×640 image:")
    for label, processor, net in (("ours", ours, model), ("built-in", builtin, builtin_model)):
        pre = best_time(lambda: processor(images=[image], return_tensors="pt"), repeats)
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            forward = best_time(lambda: net(pixel_values=pixel_values), max(1, repeats // 2))
        print(f"  {label:<9} preprocess {pre * 1e3:7.1f} ms   forward {forward * 1e3:8.1f} ms")
    a = best_time(lambda: run(ours, model), max(1, repeats // 2))
    b = best_time(lambda: run(builtin, builtin_model), max(1, repeats // 2))
    report("end to end", a, b, 0.7)


def memory_probe() -> None:
    """Runs in a fresh process: peak RSS added by post-processing one 3000×1500 image."""
    from modeling_eomt import EomtImageProcessor

    processor = EomtImageProcessor(size=SIZE)
    target = (3000, 1500)
    outputs = fake_outputs(confident=60, target=target)
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for task in ("panoptic", "instance"):
        getattr(processor, f"post_process_{task}_segmentation")(outputs, [target], threshold=0.5)
    done.set()
    sampler.join()
    added = peak[0] - before
    naive = QUERIES * target[0] * target[1] * 4 / 2**20
    print(f"\nmemory: panoptic + instance post-processing of a 3000×1500 image added {added:.0f} MB resident memory at peak "
          f"(upsampling all {QUERIES} queries at once: {naive:.0f} MB per tensor; target well under 1024 MB)")  # fmt: skip


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-size", default="small", choices=("small", "base", "large"))
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe()
        return
    bench_post_processing(args.repeats)
    if not args.skip_end_to_end:
        bench_end_to_end(args.repeats, args.model_size)
    subprocess.run([sys.executable, __file__, "--memory-probe"], check=True)


if __name__ == "__main__":
    main()
