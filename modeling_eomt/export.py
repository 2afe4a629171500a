"""Export EoMT for deployment: the inference forward as an ONNX file (default) or a `torch.export` program.

    eomt export MODEL OUTPUT_DIR [--format onnx|pt2] [--dtype float32|float16|bfloat16] [--opset 18]
                                 [--static-shape H W] [--no-verify]

`OUTPUT_DIR` receives `model.onnx` (or `model.pt2`), `config.json` and `preprocessor_config.json`. The graph follows
optimum's image-segmentation convention: input `pixel_values` `(batch, 3, height, width)` with dynamic batch, height
and width (multiples of the patch size, as the processor makes them), outputs `class_queries_logits` and
`masks_queries_logits`. Inputs and outputs are float32 whatever `dtype` the weights and arithmetic use. Post-processing
stays outside the graph: the processor's `post_process_*_segmentation` takes the runtime's outputs.

By default the result is checked before it is published: the runtime (onnxruntime, or `torch.export.load`) runs it at
the export size (batch 1) and at a second, non-square size (batch 2) against the float32 PyTorch model. Everything is
written to a temporary folder next to `OUTPUT_DIR` and renamed at the end, so a failed export or check leaves nothing.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .modeling import eager_attention_forward

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest accepted `max|runtime - PyTorch| / max|PyTorch|` per output, by export dtype (the reference is float32).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits")
ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")
FLOAT32_SCORES = "eomt_float32_scores"


class ExportError(Exception):
    """An export that cannot be made or that failed its check; nothing was written."""


class MissingExtraError(ExportError, ImportError):
    """The packages of the `onnx` extra are not installed."""


class ExportResult(NamedTuple):
    """Where the export went and, when verified, the largest relative error per checked input shape."""

    output_dir: Path
    file: Path
    relative_errors: dict[tuple[int, ...], float] | None


def float32_scores_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             *args, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """Eager attention in float32 for half-precision graphs: in float16 the scores of EoMT's larger models overflow
    to inf and the softmax returns NaN."""
    context, _ = eager_attention_forward(module, query.float(), key.float(), value.float(), *args, **kwargs)
    return context.to(value.dtype), None


class LogitsOnly(nn.Module):
    """The inference forward as the graph sees it: float32 pixels in, the two logits out in float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values=pixel_values)
        return outputs.class_queries_logits.float(), outputs.masks_queries_logits.float()


def export_model(
    model,
    output_dir: str | os.PathLike,
    format: str = "onnx",
    dtype: str = "float32",
    opset: int | None = None,
    static_shape: tuple[int, int] | None = None,
    verify: bool = True,
    processor=None,
) -> ExportResult:
    """Export an EoMT model (an instance, a saved folder or a Hub id) to `output_dir`; see the module docstring.

    Args:
        format: `"onnx"` (`model.onnx`, needs `pip install modeling-eomt[onnx]`) or `"pt2"` (`model.pt2`, for
            `torch.export.load`).
        dtype: weights and arithmetic of the graph; in half precision attention scores stay float32.
        opset: ONNX opset; default 18 (the antialiased resize of the position embeddings needs 18), 22 for
            bfloat16 (ONNX's Conv accepts bfloat16 from opset 22).
        static_shape: `(height, width)` to fix in the graph (the batch stays dynamic); default: dynamic, exported
            at the processor's input size.
        verify: run the result against the PyTorch model before publishing it.
        processor: the `EomtImageProcessor` to save (default: the checkpoint's, else one for its native size).
    """
    if format not in FORMATS:
        raise ExportError(f"Unknown format {format!r}; choose {' or '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise ExportError(f"Unknown dtype {dtype!r}; choose {', '.join(DTYPES)}.")
    least_opset = 22 if dtype == "bfloat16" else 18
    opset = least_opset if opset is None else opset
    if format == "onnx" and opset < least_opset:
        why = "Conv accepts bfloat16" if dtype == "bfloat16" else "the antialiased Resize of the position embeddings"
        raise ExportError(f"opset {opset} is too old for this export: {why} from opset {least_opset}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"{output_dir} is a file; pass a folder (it is created if missing).")
    if format == "onnx":
        require_onnx_extra(verify)
    reference, processor = _load(model, processor)
    if any(prob > 0 for prob in reference.attn_mask_probs.tolist()):
        raise ExportError(
            f"the model still masks its attention (attn_mask_probs {reference.attn_mask_probs.tolist()}): masked "
            "attention is a training mechanism, annealed to 0 by the end of training. Export a trained model, or call "
            "`model.set_attn_mask_probs([0.0] * config.num_blocks)` first."
        )
    patch = reference.config.patch_size
    height, width = static_shape or processor.pad_size()
    if height % patch or width % patch or min(height, width) < patch:
        raise ExportError(f"the export size {height}×{width} must be positive multiples of the patch size {patch}.")

    graph_model = copy.deepcopy(reference).to(DTYPES[dtype])
    graph_model.set_upscale_implementation("reference")  # the banded upscale loops over a size-dependent band count
    if dtype != "float32":
        from transformers import AttentionInterface

        AttentionInterface.register(FLOAT32_SCORES, float32_scores_attention)
        graph_model.set_attn_implementation(FLOAT32_SCORES)
    example = torch.randn(2, 3, height, width)  # batch 2: torch.export specialises a dimension of size 1
    dynamic = {0: torch.export.Dim("batch")}
    if not static_shape:
        dynamic.update({2: patch * torch.export.Dim("h"), 3: patch * torch.export.Dim("w")})

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()  # not mkdtemp: its private mode would stay with the published folder
    try:
        file = staging / FORMATS[format]
        _write_graph(LogitsOnly(graph_model).eval(), example, {INPUT_NAME: dynamic}, file, opset)
        reference.config.save_pretrained(staging)
        processor.save_pretrained(staging)
        errors = None
        if verify:
            second = (height, width) if static_shape else (max(patch, height // 2 // patch * patch), width)
            shapes = [(1, 3, height, width), (2, 3, *second)]
            errors = check(reference, file, shapes, TOLERANCES[DTYPES[dtype]])
        _publish(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(output_dir, output_dir / FORMATS[format], errors)


def require_onnx_extra(with_runtime: bool = True) -> None:
    """Import the `onnx` extra's packages (onnxruntime only for checks), or say how to install them."""
    missing = []
    for name in ONNX_EXTRA if with_runtime else ONNX_EXTRA[:2]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"ONNX export needs {', '.join(missing)} (not installed): pip install 'modeling-eomt[onnx]'"
        )


def _load(model, processor):
    """The float32 CPU model in eval mode (a copy: the caller's model is left as it is) and its processor."""
    from . import EomtForUniversalSegmentation, EomtImageProcessor

    if isinstance(model, EomtForUniversalSegmentation):
        reference = copy.deepcopy(model)
    elif isinstance(model, (str, os.PathLike)):
        reference = _from_pretrained(str(model))
        if processor is None:
            try:
                processor = EomtImageProcessor.from_pretrained(str(model))
            except OSError:  # no preprocessor_config.json
                pass
    else:
        raise ExportError(f"expected an EoMT model, a folder or a Hub id, got {type(model).__name__}.")
    if processor is None:  # the native size, padded (panoptic and instance checkpoints)
        size = reference.config.image_size
        processor = EomtImageProcessor(size={"shortest_edge": size, "longest_edge": size})
    return reference.float().cpu().eval(), processor


def _from_pretrained(name: str):
    from transformers import AutoConfig, AutoModelForUniversalSegmentation

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot load model {name}: {_first_line(error)}") from None
    if config.model_type not in ("eomt", "eomt_dinov3"):
        raise ExportError(f"{name} is not an EoMT checkpoint (model_type {config.model_type!r}).")
    try:
        return AutoModelForUniversalSegmentation.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise ExportError(f"cannot load the weights of {name}: {_first_line(error)}") from None


def _write_graph(module: nn.Module, example: torch.Tensor, dynamic_shapes: dict, file: Path, opset: int) -> None:
    try:
        with torch.no_grad():
            if file.suffix == ".pt2":
                torch.export.save(torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes), file)
            else:
                program = torch.onnx.export(
                    module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes, verbose=False,
                )  # fmt: skip
                program.save(str(file))
    except Exception as error:  # the exporters raise many kinds; the chained traceback keeps the details
        raise ExportError(f"the {file.suffix[1:]} export failed: {_first_line(error)}") from error


def load_runtime(file: Path) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The exported file as a function of `pixel_values` returning the named outputs, run by onnxruntime (CPU) or
    `torch.export.load`."""
    if file.suffix == ".pt2":
        program = torch.export.load(file).module()

        def run(pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return dict(zip(OUTPUT_NAMES, program(pixel_values)))

        return run
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])

    def run(pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixel_values.numpy()})
        return {name: torch.from_numpy(array) for name, array in zip(OUTPUT_NAMES, outputs)}

    return run


def check(reference: nn.Module, file: Path, shapes: list[tuple[int, ...]], tolerance: float) -> dict:
    """Largest relative error of the exported file's outputs against `reference` per input shape; raises
    `ExportError` when an output is not finite or is further than `tolerance`."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator) for shape in shapes]
    try:
        runtime = load_runtime(file)
        outputs = [runtime(pixel_values) for pixel_values in inputs]
    except Exception as error:  # a runtime that cannot load or run the file fails the check
        raise ExportError(
            f"the runtime cannot run the export ({_first_line(error)}); the export was not written. For a target "
            "runtime that can (onnxruntime's CPU provider has no bfloat16 kernels), pass verify=False / --no-verify."
        ) from error
    errors = {}
    for shape, pixel_values, got in zip(shapes, inputs, outputs):
        with torch.no_grad():
            expected = reference(pixel_values=pixel_values)
        worst = 0.0
        for name in OUTPUT_NAMES:
            target = getattr(expected, name)
            if got[name].shape != target.shape or not got[name].isfinite().all():
                problem = f"shape {tuple(got[name].shape)}" if got[name].shape != target.shape else "non-finite values"
                raise ExportError(f"the exported {name} has {problem} at input {shape}; the export was not written.")
            worst = max(worst, ((got[name] - target).abs().max() / target.abs().max().clamp_min(1e-12)).item())
        if not worst <= tolerance:
            raise ExportError(
                f"the exported model differs from PyTorch at input {shape}: relative error {worst:.2e} > {tolerance:.0e}; "
                "the export was not written."
            )
        errors[shape] = worst
    return errors


def _publish(staging: Path, output_dir: Path) -> None:
    """A new folder is renamed into place at once; into an existing folder, the files are renamed one by one."""
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    for file in staging.iterdir():
        os.replace(file, output_dir / file.name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `eomt export` command's arguments."""
    parser.add_argument("model", metavar="MODEL", help="folder saved by save_pretrained, or a Hub id")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder for the exported files (created if missing)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="onnx or pt2 (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="weights and arithmetic; half precision keeps attention scores in float32 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--opset", type=int, help="ONNX opset (default: 18; 22 for bfloat16, the least that works)")
    parser.add_argument(
        "--static-shape", type=int, nargs=2, metavar=("H", "W"),
        help="fix the input height and width in the graph (batch stays dynamic)",
    )  # fmt: skip
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip running the export against PyTorch"
    )


def run(args: argparse.Namespace) -> int:
    """`eomt export`: export, then one line on what was written and how it was checked."""
    result = export_model(
        args.model, args.output_dir, args.format, args.dtype, args.opset, args.static_shape, args.verify
    )
    size_mb = sum(f.stat().st_size for f in result.output_dir.glob(f"{result.file.name}*")) / 1e6
    checked = "not verified"
    if result.relative_errors is not None:
        shapes = ", ".join("×".join(map(str, shape)) for shape in result.relative_errors)
        checked = f"verified at {shapes}: max relative error {max(result.relative_errors.values()):.1e}"
    print(f"Exported {args.model} → {result.file} ({args.dtype}, {size_mb:.1f} MB; {checked})")
    return 0
