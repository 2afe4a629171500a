"""Conversion of EoMT checkpoints of the original release (PyTorch Lightning + timm or transformers' DINOv3) to this
package's Hub format.

Pipeline: read the source without unpickling code → (DINOv3) add the base backbone to the stored deltas → read the
architecture off the weights (the base config, preset, original `config.json` and flags fill in the rest) → map
every tensor to its new name, as views → run the independent reference forward on the original tensors → write
the shards into a temporary folder → reload them with our model and compare logits → add the processor config and
model card → rename the folder into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.utils import logging

from ..configuration import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    EomtBaseConfig,
    EomtConfig,
)
from ..image_processing import EomtImageProcessor
from ..model_card import build_model_card
from ..umask import apply_umask
from .architecture import Target, resolve_target
from .dinov3 import absolute_attn_mask_probs, is_dinov3_checkpoint, load_base_backbone, merge_deltas
from .errors import ConversionError
from .mapping import DERIVED_KEYS, describe, map_state_dict, model_class
from .reading import CHECKPOINT_SUFFIXES, load_original, resolve_source
from .reference import reference_forward

logger = logging.get_logger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The check runs in float64 by default: float32 rounding alone moves EoMT-L logits by ~1e-4 (measured on random
# weights), so only float64 makes the tolerance a statement about the conversion rather than about the arithmetic.
VERIFY_DTYPES = {"float64": torch.float64, "float32": torch.float32}
MAX_SHARD_SIZE = "2GB"
# Tolerance of the logit check per verification dtype: float32 allows for its own rounding.
DEFAULT_ATOL = {"float64": 1e-4, "float32": 1e-3}


# ------------------------------------------------------------------------------------------------------------ writing
def write_weights(
    tensors: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype, progress: bool = True
) -> None:
    """Safetensors shards (with an index when there are several), one shard in memory at a time."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD_SIZE)
    with tqdm(total=len(tensors), desc="Writing tensors", unit="tensor", disable=not progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard, storages = {}, set()
            for name in names:
                tensor = tensors[name]
                storage = tensor.untyped_storage().data_ptr()
                # Chunks of one fused tensor share its storage, which safetensors refuses: copy all but the first.
                if tensor.dtype != dtype or storage in storages or not tensor.is_contiguous():
                    tensor = tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
                else:
                    storages.add(storage)
                shard[name] = tensor
            save_file(shard, directory / filename, metadata={"format": "pt"})
            del shard
            bar.update(len(names))
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------- verification
def verification_pixels(image_size: int) -> torch.Tensor:
    """The fixed input of the check: one image of uniform noise in [0, 1] at the native size."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, image_size, image_size, generator=generator)


def logit_difference(
    model: torch.nn.Module, reference: tuple[torch.Tensor, torch.Tensor], pixels: torch.Tensor, mean, std
) -> float:
    """Max abs difference between our model (on normalised pixels, in the model's dtype) and the reference logits."""
    dtype = next(model.parameters()).dtype
    normalised = (pixels.to(dtype) - torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=dtype
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        output = model(pixel_values=normalised)
    ref_masks, ref_classes = reference
    differences = torch.stack(
        [
            (output.masks_queries_logits.double() - ref_masks.double()).abs().max(),
            (output.class_queries_logits.double() - ref_classes.double()).abs().max(),
        ]
    )
    return differences.max().item()  # torch's max, unlike Python's, keeps a NaN


# ----------------------------------------------------------------------------------------------------------- command
@dataclass
class ConversionResult:
    output_dir: Path
    config: EomtBaseConfig
    task: str
    dataset: str | None
    num_parameters: int
    dtype: str
    max_abs_difference: float | None  # None when verification was skipped
    seconds: float


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    preset: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    num_queries: int | None = None,
    num_labels: int | None = None,
    num_blocks: int | None = None,
    task: str | None = None,
    base_backbone: str | os.PathLike | None = None,
    attn_mask_probs: str | None = None,
    dtype: str = "float32",
    verify: bool = True,
    verify_dtype: str = "float64",
    atol: float | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert an original EoMT checkpoint into a folder loadable with `from_pretrained` and the pipeline.

    Everything is written to a temporary sibling of `output_dir`, which replaces it only once all files exist and,
    with `verify`, the converted model reproduces the reference logits within `atol` (both computed in
    `verify_dtype`, on the weights as written in `dtype`; default `DEFAULT_ATOL[verify_dtype]`). Raises
    `ConversionError` on bad input (nothing is written then).

    A DINOv3 checkpoint stores its backbone as deltas against `base_backbone` (a Hub id or a local folder in
    transformers' DINOv3 format; a DINOv3 preset supplies its Hub id); `attn_mask_probs` ("raw" or "delta") says
    how it stores its masking probabilities when their values cannot tell.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir).expanduser()
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if verify_dtype not in VERIFY_DTYPES:
        raise ConversionError(
            f"Unknown verification dtype {verify_dtype!r}; choose one of {', '.join(VERIFY_DTYPES)}."
        )
    atol = DEFAULT_ATOL[verify_dtype] if atol is None else atol
    if not atol > 0:  # also NaN, which no difference could exceed
        raise ConversionError(f"--atol must be a positive tolerance, got {atol}.")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"{output_dir} is a file; pass a folder path as OUTPUT_DIR.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{output_dir} exists and is not empty; pass --overwrite to replace it.")

    source_path = resolve_source(source)
    if output_dir.resolve() in (source_path.resolve(), *source_path.resolve().parents):
        raise ConversionError(
            f"OUTPUT_DIR {output_dir} holds the source {source_path}, which replacing it would delete; pick another "
            "folder."
        )
    if preset is None and _name(source) in PRESETS:
        preset = _name(source)
        logger.info(f"Using preset {preset!r} (from the source name).")
    original, original_config = load_original(source_path)
    _check_finite(original)
    base_config = None
    if is_dinov3_checkpoint(original):
        if backbone is not None:
            raise ConversionError(
                f"{source} is a DINOv3 checkpoint; --backbone is for DINOv2 ones: pass --base-backbone instead."
            )
        if base_backbone is None and preset in PRESETS and PRESETS[preset].backbone == "dinov3":
            base_backbone = PRESETS[preset].base_backbone
        if base_backbone is None:
            raise ConversionError(
                f"{source} is a DINOv3 EoMT checkpoint, which stores its backbone as deltas against the DINOv3 "
                "weights it was trained from; pass --base-backbone NAME_OR_PATH (a Hub id such as "
                "facebook/dinov3-vitl16-pretrain-lvd1689m or a local folder in transformers' DINOv3 format) or the "
                "--preset of a released DINOv3 checkpoint."
            )
        with contextlib.nullcontext() if progress else _without_progress_bars():
            base, base_config = load_base_backbone(base_backbone)
        original = merge_deltas(original, base, base_config, base_backbone)
        del base
    elif base_backbone is not None:
        raise ConversionError(
            f"{source} is a DINOv2 checkpoint (timm names), which stores absolute weights; drop --base-backbone."
        )
    elif attn_mask_probs is None:
        attn_mask_probs = "raw"  # only the DINOv3 checkpoints store deltas
    if "network.attn_mask_probs" in original:
        original["network.attn_mask_probs"] = absolute_attn_mask_probs(
            original["network.attn_mask_probs"], attn_mask_probs
        )
    target = resolve_target(
        original, original_config, preset, backbone, image_size, num_queries, num_labels, num_blocks, task, base_config
    )
    config = target.config
    converted = map_state_dict(original, config)
    converted["criterion.empty_weight"] = _empty_weight(config)
    mean = _statistic(original, "network.encoder.pixel_mean", IMAGENET_MEAN)
    std = _statistic(original, "network.encoder.pixel_std", IMAGENET_STD)

    reference = pixels = None
    if verify:
        pixels = verification_pixels(config.image_size)
        try:
            reference = reference_forward(
                original,
                pixels,
                config.num_attention_heads,
                DTYPES[dtype],
                VERIFY_DTYPES[verify_dtype],
                config.layer_norm_eps,
                getattr(config, "rope_theta", 100.0),
                config.mlp_activation,
            )
        except ValueError as error:
            raise ConversionError(f"Cannot verify: {error} Pass --no-verify to convert without the check.") from error

    created = _first_missing(output_dir.parent)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output_dir)
    # Not mkdtemp, whose folders are private (0700): the result is an ordinary folder, with the umask's permissions.
    # The name holds our process id, so a later run can tell the leftovers of a killed run from a running one's.
    staging = output_dir.parent / f".{output_dir.name}.{os.getpid()}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        config.architectures = [model_class(config).__name__]
        config.dtype = DTYPES[dtype]
        config.save_pretrained(staging)
        write_weights(converted, staging, DTYPES[dtype], progress)
        num_parameters = sum(
            t.numel() for name, t in converted.items() if name not in DERIVED_KEYS + ("attn_mask_probs",)
        )
        del converted, original  # the reload below is the only copy of the weights from here on

        difference = None
        if verify:
            with contextlib.nullcontext() if progress else _without_progress_bars():
                difference = _verify(staging, config, VERIFY_DTYPES[verify_dtype], reference, pixels, mean, std)
            if not difference <= atol:
                hint = " (or float32 rounding: check with --verify-dtype float64)" if verify_dtype != "float64" else ""
                raise ConversionError(
                    f"Verification failed: converted logits differ from the reference by {difference:.3g} "
                    f"(> {atol:g}); the checkpoint does not match {describe(config)} or the mapping is wrong{hint}."
                )

        processor = EomtImageProcessor.for_task(
            target.task, config.image_size, mean, std, do_reduce_labels=target.dataset == "ade20k_semantic"
        )
        if target.task == "semantic" and config.uses_rope:
            # The DINOv3 release evaluates semantic segmentation like panoptic: long side scaled, padded to a square.
            processor.size = {"shortest_edge": config.image_size, "longest_edge": config.image_size}
            processor.do_split_image, processor.do_pad = False, True
        processor.save_pretrained(staging)
        metrics = None
        if target.preset is not None and _is_preset(config, target):
            metrics = {PRESETS[target.preset].metric: PRESETS[target.preset].result}
        card = build_model_card(
            config,
            task=target.task,
            dataset=target.dataset,
            metrics=metrics,
            model_name=target.preset or output_dir.name,
            repo_id=push_to_hub,
            notes=_provenance(source, difference, atol, base_backbone),
        )
        (staging / "README.md").write_text(card)

        apply_umask(staging)
        _replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise

    if push_to_hub:
        from huggingface_hub import HfApi

        try:
            api = HfApi()
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=output_dir, commit_message=f"Convert {source}")
        except Exception as error:  # network, authentication, permissions, …
            raise ConversionError(
                f"{output_dir} is complete, but uploading it to {push_to_hub} failed ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); log in with `hf auth login` "
                f"and upload the folder with `hf upload {push_to_hub} {output_dir}`."
            ) from error
    return ConversionResult(
        output_dir, config, target.task, target.dataset, num_parameters, dtype, difference, time.perf_counter() - start
    )


def _verify(
    directory: Path, config: EomtBaseConfig, dtype: torch.dtype, reference, pixels: torch.Tensor, mean, std
) -> float:
    model = model_class(config).from_pretrained(directory, dtype=dtype).eval()
    return logit_difference(model, reference, pixels, mean, std)


def _check_finite(original: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite weights, which no check of logits could vouch for."""
    for key, tensor in original.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise ConversionError(
                f"Tensor {key!r} holds {count} NaN or infinite values: the checkpoint is damaged (or training "
                "diverged); convert an earlier or re-downloaded checkpoint."
            )


def _provenance(
    source: str | os.PathLike, difference: float | None, atol: float, base_backbone: str | os.PathLike | None
) -> str:
    text = f"Converted from the original checkpoint `{source}` with `eomt-convert`"
    if difference is None:
        text += " (logits not verified)."
    else:
        text += f"; its logits match a reference forward of the original weights to {difference:.1e} (≤ {atol:g})."
    if base_backbone is not None:
        text += (
            f" The backbone is the DINOv3 backbone `{base_backbone}` plus the checkpoint's deltas, so its weights "
            "also fall under the DINOv3 licence of that backbone."
        )
    return text


def _is_preset(config: EomtConfig, target: Target) -> bool:
    """Whether the converted model is exactly the released one (so the released result applies to it)."""
    spec = PRESETS[target.preset]
    fields = spec.config_kwargs()
    return target.dataset == spec.labels and all(getattr(config, key) == value for key, value in fields.items())


def _empty_weight(config: EomtConfig) -> torch.Tensor:
    from ..loss import EomtLoss

    return EomtLoss(config).empty_weight


def _statistic(original: dict[str, torch.Tensor], key: str, default: tuple[float, ...]) -> list[float]:
    if key not in original:
        return list(default)
    return [round(value, 6) for value in original[key].flatten().tolist()]


def _name(source: str | os.PathLike) -> str:
    """Name of a source without checkpoint suffix: folder, file stem or Hub repo name (may be a preset name; the
    DINOv3 ADE20K release is also published as `ade_semantic_…`)."""
    path = Path(str(source).rstrip("/"))
    name = path.stem if path.suffix in CHECKPOINT_SUFFIXES else path.name
    return "ade20k_" + name.removeprefix("ade_") if name.startswith("ade_") else name


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` in `target`'s place. An existing `target` is moved aside first and deleted only once `new`
    is in place (and moved back if that fails), so a failure never loses both."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced.", dir=target.parent))
    os.replace(target, aside)  # onto the empty folder mkdtemp made
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as error:
        logger.warning(f"The new folder is in place, but the replaced one, {aside}, could not be deleted: {error}")


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """transformers' progress bars (e.g. "Loading weights") off for the block."""
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _remove_stale_staging(output_dir: Path) -> None:
    """Delete staging folders for `output_dir` left by conversions that were killed (their process is gone)."""
    if os.name != "posix" or not output_dir.parent.is_dir():  # liveness is checked with POSIX signal 0
        return
    pattern = re.compile(rf"\.{re.escape(output_dir.name)}\.(\d+)\.[0-9a-f]{{32}}")
    for candidate in output_dir.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match is None or not candidate.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # a conversion still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):  # alive under another user, or no valid pid at all
            continue
        logger.warning(f"Removing {candidate}, the staging folder of an interrupted conversion.")
        shutil.rmtree(candidate, ignore_errors=True)


def _first_missing(path: Path) -> Path | None:
    """The outermost ancestor of `path` (inclusive) that does not exist yet, to undo creating it on failure."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing
