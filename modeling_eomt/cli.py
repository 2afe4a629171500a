"""The `eomt` command line: `eomt segment IMAGE_OR_DIR... --model PATH_OR_HUB_ID` writes, per image, an overlay PNG
and a JSON of segments (label, score, area, bbox and an RLE or PNG mask)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .configuration import TASKS
from .rle import encode_segment_rles
from .umask import apply_umask

if TYPE_CHECKING:
    from .visualize import SegmentTally

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Pixels per band of the per-segment work on a segment id map (area, bbox, RLE, PNG of ids): bounded temporaries.
BAND_PIXELS = 2**20
# Command-line flag → post-processing option; unset flags leave the processor's defaults.
OPTION_FLAGS = {
    "threshold": "threshold",
    "mask_threshold": "mask_threshold",
    "overlap_threshold": "overlap_mask_area_threshold",
}


class CliError(Exception):
    """A problem worth one line on stderr and a non-zero exit, not a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eomt", description="EoMT image segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser(
        "segment",
        help="segment images and write overlays and JSON",
        description="Segment images; writes <name>.png (overlay) and <name>.json (segments) per image.",
    )
    segment.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    segment.add_argument("--model", required=True, help="folder saved by save_pretrained, or a Hub id")
    segment.add_argument(
        "--task", choices=TASKS, help="default: semantic for sliding-window checkpoints, else panoptic"
    )
    segment.add_argument("--output", default="eomt_output", help="output folder (default: %(default)s)")
    segment.add_argument("--threshold", type=float, help="panoptic, instance: minimum segment score (default: 0.8)")
    segment.add_argument(
        "--mask-threshold", type=float, help="panoptic, instance: mask probability cut (default: 0.5)"
    )
    segment.add_argument("--overlap-threshold", type=float, help="panoptic: kept share of a mask (default: 0.8)")
    segment.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:1, mps, xpu or auto (default: the accelerator torch finds, else cpu)",
    )
    segment.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default: 1)")
    segment.add_argument(
        "--mask-format", choices=("rle", "png"), default="rle",
        help="rle: COCO RLE in the JSON; png: a 16-bit PNG of segment ids + 1 next to it (default: rle)",
    )  # fmt: skip
    from . import export

    export.add_arguments(commands.add_parser("export", help="export to ONNX (or torch.export) for deployment",
                                             description=export.__doc__.split("\n\n")[0]))  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return export.run(args) if args.command == "export" else run_segment(args)
    except (CliError, export.ExportError) as error:
        print(f"eomt: error: {error}", file=sys.stderr)
        return 2


def run_segment(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}.")
    errors: list[str] = []

    def report(message: str) -> None:
        errors.append(message)
        tqdm.write(f"eomt: error: {message}", file=sys.stderr)

    input_errors: list[str] = []
    files = list(find_images(args.inputs, input_errors.append))
    if not files:
        raise CliError("; ".join(input_errors) or "no images to segment.")
    for message in input_errors:
        report(message)

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CliError(f"--output {output} is a file; pass a folder (it is created if missing).")
    device = _device(args.device)
    model, processor = load_checkpoint(args.model, device)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create the output folder {output}: {error.strerror or error}") from None
    task = args.task or ("semantic" if processor.do_split_image else "panoptic")
    given = [flag for flag in OPTION_FLAGS if getattr(args, flag) is not None]
    options = {OPTION_FLAGS[flag]: getattr(args, flag) for flag in given}
    if given and (task == "semantic" or processor.do_split_image):  # see post_process_semantic_segments
        flags = ", ".join(f"--{flag.replace('_', '-')}" for flag in given)
        note = f"{flags} not used: {task} segments here are the classes of the semantic map."
        print(f"eomt: note: {note}", file=sys.stderr)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    names = _unique_names(files)

    start, done, num_segments = time.perf_counter(), 0, 0
    progress = tqdm(total=len(files), unit="image", desc="Segmenting", disable=None)
    for batch in _batches(files, args.batch_size):
        images = []
        for path in batch:
            try:
                images.append((path, read_image(path)))
            except CliError as error:
                report(str(error))
                progress.update()
        # A batch or an image that fails in any way (out of memory, a full disk, a bug) must not stop the others.
        for group in _stackable_groups(processor, images):
            try:
                results = predict(model, processor, [image for _, image in group], task, options)
            except Exception as error:  # noqa: BLE001
                for path, _ in group:
                    report(f"cannot segment {path}: {_first_line(error)}")
                progress.update(len(group))
                continue
            for (path, image), (segmentation, segments) in zip(group, results):
                try:
                    write_outputs(output / names[path], path, image, segmentation, segments, id2label, task, args)
                    done += 1
                    num_segments += len(segments)
                except Exception as error:  # noqa: BLE001
                    report(f"cannot write results for {path}: {_first_line(error)}")
                progress.update()
    progress.close()

    elapsed = time.perf_counter() - start
    failed = f", {len(errors)} error(s)" if errors else ""
    print(
        f"Segmented {done}/{len(files)} image(s) ({task}, {num_segments} segments) in {elapsed:.1f} s "
        f"→ {output}{failed}"
    )
    return 1 if errors else 0


def find_images(inputs: Sequence[str], report: Callable[[str], object]) -> Iterator[Path]:
    """Image files named directly, and the image files (by suffix) directly inside named folders."""
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                report(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            yield from found
        elif path.is_file():
            yield path
        else:
            report(f"no such file or folder: {path}")


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            # in place, and no RGB → RGB copy: each copy of a 10000×10000 photo is 300 MB
            ImageOps.exif_transpose(image, in_place=True)
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CliError(f"cannot read image {path}: {error}") from None


def load_checkpoint(name: str, device: torch.device):
    """Our model and processor from a saved folder or Hub id, with one-line errors for the usual mistakes."""
    from transformers import AutoConfig

    from . import EomtImageProcessor
    from .modeling import MODEL_CLASSES

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CliError(f"{path} is not a model folder (no config.json); pass a folder saved with save_pretrained.")
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:  # cannot be a Hub id ("org/name")
        raise CliError(f"model path {name} does not exist.")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError, TypeError) as error:  # TypeError: a config field of the wrong type or misspelled
        where = "its config.json" if path.exists() else "not a local folder; tried the Hub"
        raise CliError(f"cannot load model {name} ({where}): {_first_line(error)}") from None
    if config.model_type not in MODEL_CLASSES:
        raise CliError(
            f"{name} is not an EoMT checkpoint (model_type {config.model_type!r}, expected 'eomt' or 'eomt_dinov3')."
        )
    source = str(path) if path.exists() else name
    try:
        model = MODEL_CLASSES[config.model_type].from_pretrained(source).to(device).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise CliError(f"cannot load the weights of {name}: {_first_line(error)}") from None
    if path.exists() and not (path / "preprocessor_config.json").exists():  # the model's native size, padded
        return model, EomtImageProcessor(size={"shortest_edge": config.image_size, "longest_edge": config.image_size})
    try:
        processor = EomtImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        # A broken file must not silently fall back to the defaults (a semantic model would run as panoptic).
        raise CliError(f"cannot load the processor config of {name}: {_first_line(error)}") from None
    return model, processor


@torch.inference_mode()
def predict(
    model, processor, images: list[Image.Image], task: str, options: dict
) -> list[tuple[torch.Tensor, list[dict]]]:
    """(segment id map, segments) per image of a batch the processor can stack; `options` go to panoptic or
    instance post-processing."""
    device = next(model.parameters()).device
    inputs = processor(images, device=device)
    pixel_values = inputs["pixel_values"].to(device, model.dtype)
    outputs = model(pixel_values=pixel_values, patch_offsets=inputs.get("patch_offsets"))
    sizes = [(image.height, image.width) for image in images]
    results = processor.post_process(outputs, task, sizes, as_segments=True, **options)
    return [(r["segmentation"].cpu(), r["segments_info"]) for r in results]


def write_outputs(stem: Path, source: Path, image, segmentation, segments, id2label, task, args) -> None:
    """`<stem>.png` overlay, `<stem>.json` segments (and `<stem>.segments.png` ids with --mask-format png);
    `stem` is the output folder joined with the image's output name."""
    from .visualize import SegmentTally, draw_overlay

    ids = segmentation.numpy()
    records = []
    segment_ids = [segment["id"] for segment in segments]
    tally = SegmentTally(ids, segment_ids)  # filled by the records' pass, reused by the overlay
    summaries = _segment_summaries(ids, segment_ids, tally)
    for segment in segments:
        area, bbox, counts = summaries[segment["id"]]
        record = {
            "id": segment["id"],
            "label_id": segment["label_id"],
            "label": id2label.get(segment["label_id"], str(segment["label_id"])),
            "score": segment.get("score"),
            "area": area,
            "bbox": bbox,
        }
        if args.mask_format == "rle":
            record["rle"] = {"size": [int(ids.shape[0]), int(ids.shape[1])], "counts": counts}
        else:
            record["png_value"] = segment["id"] + 1
        records.append(record)
    summary = {"image": str(source), "width": image.width, "height": image.height, "task": task,
               "model": args.model, "segments": records}  # fmt: skip
    files = {}
    if args.mask_format == "png":
        summary["mask_png"] = stem.name + ".segments.png"
        values = np.empty(ids.shape, dtype=np.uint16)
        for rows in _bands(ids.shape[0], BAND_PIXELS // ids.shape[1]):
            values[rows] = (ids[rows] + 1).clip(0, 65535)
        files[summary["mask_png"]] = _png(Image.fromarray(values))
        del values
    files[f"{stem.name}.png"] = _png(draw_overlay(image, ids, records, id2label, tally=tally))
    files[f"{stem.name}.json"] = json.dumps(summary, indent=2).encode()
    _write_together(stem.parent, files)


def _segment_summaries(
    ids: np.ndarray, segment_ids: list[int], tally: SegmentTally
) -> dict[int, tuple[int, list[int], str]]:
    """Area, COCO bbox `[x, y, width, height]` and compressed RLE of each segment of `ids` whose id is in
    `segment_ids`, in one pass over the map a band of columns at a time (RLE runs down the columns), which fills
    `tally` (a fresh `SegmentTally` over `ids` and `segment_ids`): a full-size mask of a 10000×10000 image would take
    100 MB, its RLE flattening as much again."""
    if segment_ids and min(segment_ids) < 0:
        raise ValueError(f"Segment ids must be >= 0 (negative ids mark void pixels), got {min(segment_ids)}.")
    height, width = ids.shape

    def column_bands() -> Iterator[np.ndarray]:
        for band in _bands(width, BAND_PIXELS // max(1, height)):
            tally.add(ids[:, band], left=band.start)
            yield ids[:, band]

    rles = encode_segment_rles(column_bands(), segment_ids)
    summaries = {}
    for segment_id in segment_ids:
        box = tally.box(segment_id)
        bbox = [0, 0, 0, 0] if box is None else [box[0], box[1], box[2] - box[0], box[3] - box[1]]
        summaries[segment_id] = int(tally.areas[segment_id + 1]), bbox, rles[segment_id]
    return summaries


def _bands(length: int, step: int) -> Iterator[slice]:
    step = max(1, step)
    return (slice(start, min(length, start + step)) for start in range(0, length, step))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_together(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name → content) to temporary files in `folder`, then rename them all: a failure while writing
    (a full disk) leaves the earlier versions whole and no temporary file behind; only renames remain at the end."""
    temporaries: dict[str, str] = {}
    try:
        for name, data in files.items():
            handle, temporaries[name] = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(handle, "wb") as f:
                f.write(data)
            apply_umask(Path(temporaries[name]))  # mkstemp creates 0600 files
        for name, temporary in temporaries.items():
            os.replace(temporary, folder / name)
    finally:
        for temporary in temporaries.values():
            Path(temporary).unlink(missing_ok=True)


def _stackable_groups(processor, images: list[tuple[Path, Image.Image]]) -> list[list[tuple[Path, Image.Image]]]:
    """`(path, image)` pairs in batches the processor can stack: all together when it pads or cuts windows, else
    one batch per resized size."""
    if processor.do_pad or processor.do_split_image:
        return [images] if images else []
    groups: dict[tuple[int, int], list[tuple[Path, Image.Image]]] = {}
    for path, image in images:
        groups.setdefault(processor.resized_size(image.height, image.width), []).append((path, image))
    return list(groups.values())


def _unique_names(files: Sequence[Path]) -> dict[Path, str]:
    """Output stem per input: the file name without suffix, numbered when two inputs share it."""
    names, used = {}, set()
    for path in files:
        stem, n = path.stem, 1
        while stem in used:
            n += 1
            stem = f"{path.stem}_{n}"
        used.add(stem)
        names[path] = stem
    return names


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _device(name: str) -> torch.device:
    if name == "auto":  # whichever accelerator torch was built for and finds (CUDA, ROCm, MPS, XPU, ...)
        return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise CliError(f"device {name!r} is not available: {str(error).splitlines()[0]}") from None
    return device


if __name__ == "__main__":
    sys.exit(main())
