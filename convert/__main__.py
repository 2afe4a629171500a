"""`python -m modeling_eomt.convert SOURCE OUTPUT_DIR [options]` (also installed as `eomt-convert`)."""

from __future__ import annotations

import argparse
import sys

from ..configuration import PRESETS, TASKS
from .convert import DEFAULT_ATOL, DTYPES, VERIFY_DTYPES, ConversionError, convert_checkpoint
from .dinov3 import ATTN_MASK_PROBS_STORAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eomt-convert",
        description="Convert a checkpoint of the original EoMT release (tue-mps/eomt) to the Transformers format, "
        "verifying the logits against an independent forward of the original weights.",
    )
    parser.add_argument(
        "source",
        help="Original checkpoint: folder (pytorch_model.bin + config.json), file "
        "(.bin, .pt, .ckpt, .safetensors) or Hub repo id (e.g. tue-mps/coco_panoptic_eomt_large_640); DINOv2 or DINOv3.",
    )
    parser.add_argument("output_dir", help="Folder to write (replaced atomically once everything succeeded).")
    arch = parser.add_argument_group(
        "architecture (read off the weights and the source's config.json; these fill in what the weights leave "
        "open, and contradicting them is an error)"
    )
    arch.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        metavar="NAME",
        help="Released checkpoint name, e.g. coco_panoptic_eomt_large_640 (inferred from SOURCE's name).",
    )
    arch.add_argument(
        "--backbone",
        help="DINOv2 only: the timm backbone, e.g. vit_large_patch14_reg4_dinov2 (or small/base/large/giant).",
    )
    arch.add_argument("--image-size", type=int)
    arch.add_argument("--num-queries", type=int)
    arch.add_argument("--num-labels", type=int)
    arch.add_argument("--num-blocks", type=int, help="Final blocks that process the queries.")
    dinov3 = parser.add_argument_group("DINOv3 checkpoints (their backbone is stored as deltas)")
    dinov3.add_argument(
        "--base-backbone",
        metavar="NAME_OR_PATH",
        help="The DINOv3 backbone the deltas are against: a Hub id (e.g. facebook/dinov3-vitl16-pretrain-lvd1689m) or "
        "a local folder in transformers' DINOv3 format (default: the preset's).",
    )
    dinov3.add_argument(
        "--attn-mask-probs",
        choices=ATTN_MASK_PROBS_STORAGE,
        help="How the checkpoint stores attn_mask_probs (default: DINOv3 decided from its values, DINOv2 raw; "
        "needed when they cannot tell, i.e. all zeros).",
    )
    parser.add_argument("--task", choices=TASKS, help="Decides the processor settings and label names.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the written weights.")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="Skip the logit check.")
    parser.add_argument(
        "--verify-dtype",
        choices=list(VERIFY_DTYPES),
        default="float64",
        help="Arithmetic of the check: float64 isolates conversion errors; float32 halves its memory.",
    )
    parser.add_argument(
        "--atol",
        type=float,
        help="Tolerance of the logit check (default: "
        + ", ".join(f"{atol:g} in {dtype}" for dtype, atol in DEFAULT_ATOL.items())
        + ").",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUTPUT_DIR.")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the folder to this Hub repo.")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide the progress bar.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = vars(args)
    source, output_dir = options.pop("source"), options.pop("output_dir")
    try:
        result = convert_checkpoint(source, output_dir, **options)
    except ConversionError as error:
        print(f"eomt-convert: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # reading the source or writing the output (a full disk, permissions)
        print(f"eomt-convert: error: {error}", file=sys.stderr)
        return 1
    figure = "skipped" if result.max_abs_difference is None else f"max |Δlogit| = {result.max_abs_difference:.2e}"
    print(
        f"Converted {source} → {result.output_dir}\n"
        f"  parameters: {result.num_parameters / 1e6:.1f} M ({result.dtype})\n"
        f"  task: {result.task}, labels: {result.dataset or 'generic'}\n"
        f"  verification: {figure}\n"
        f"  time: {result.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
