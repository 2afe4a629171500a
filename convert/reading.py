"""Reading a source checkpoint without unpickling code: a Hub id or local path, folders with sharded or single
weight files, Lightning `.ckpt` / `.bin` / `.pt` / `.safetensors`; names cleaned of wrappers (`_orig_mod.`, ...)."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import logging

from .errors import ConversionError

logger = logging.get_logger(__name__)

CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")
# Weight files of a checkpoint folder, in order of preference.
FOLDER_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# The original release's weight files; its Hub repos hold them beside a converted copy (model.safetensors).
ORIGINAL_WEIGHTS = ("pytorch_model.bin.index.json", "pytorch_model.bin")
# `model_type`s of configs in the Transformers format (a release's Hub folder holds one beside the original weights).
CONVERTED_MODEL_TYPES = ("eomt", "eomt_dinov3")


def resolve_source(source: str | os.PathLike) -> Path:
    """A local path for `source`; Hub repo ids (`org/name`) are downloaded when a network is available."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.endswith(CHECKPOINT_SUFFIXES):
        from huggingface_hub import snapshot_download

        try:
            # The release's repos also hold a converted copy (model.safetensors): download safetensors only when
            # nothing else could be the checkpoint.
            folder = Path(snapshot_download(text, allow_patterns=["*.json", "*.bin", "*.pt", "*.pth", "*.ckpt"]))
            has_checkpoint = any(p.suffix in CHECKPOINT_SUFFIXES for p in folder.iterdir())
            if not has_checkpoint and _folder_config(folder).get("model_type") not in CONVERTED_MODEL_TYPES:
                folder = Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))
            return folder
        except Exception as error:  # offline, unknown repo, gated, …
            raise ConversionError(
                f"{text!r} is no local path and could not be downloaded from the Hub ({type(error).__name__}); "
                "check the repo id and the network, or download the checkpoint and pass its folder."
            ) from error
    raise ConversionError(
        f"{text} does not exist; pass a checkpoint folder (pytorch_model.bin + config.json), a checkpoint file "
        f"({', '.join(CHECKPOINT_SUFFIXES)}) or a Hub repo id such as tue-mps/coco_panoptic_eomt_large_640."
    )


def load_original(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The original state dict (wrappers and `_orig_mod` removed) and the folder's original `config.json` (or {})."""
    original_config: dict = {}
    if path.is_dir():
        original_config, candidates = _folder_config(path), FOLDER_WEIGHTS
        converted = original_config.get("model_type") in CONVERTED_MODEL_TYPES
        if converted:  # a Transformers config, maybe beside the original weights: those are converted, if present
            candidates = ORIGINAL_WEIGHTS
        weights = next((path / name for name in candidates if (path / name).is_file()), None)
        if weights is None and converted:
            raise ConversionError(
                f"{path} is already in the Transformers format (model_type {original_config['model_type']!r}); load it with "
                "`from_pretrained` instead of converting it."
            )
        if weights is None:
            raise ConversionError(
                f"{path} holds no weights ({', '.join(FOLDER_WEIGHTS)}); pass the folder of a downloaded checkpoint "
                "or the checkpoint file itself."
            )
        path = weights
    if path.name.endswith(".index.json"):
        index = _read_json(path)
        if not isinstance(index.get("weight_map"), dict):
            raise ConversionError(f"{path} has no `weight_map`; re-download the checkpoint's index file.")
        shard_names = sorted(set(index["weight_map"].values()))
        state_dict: dict = {}
        for shard_name in shard_names:
            state_dict.update(_load_file(path.parent / shard_name))
    else:
        state_dict = _load_file(path)
    return _clean_names(state_dict, path), original_config


def _folder_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    return _read_json(config_file) if config_file.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(
            f"{path} is not valid JSON ({error}); repair or re-download it, or delete it."
        ) from error
    if not isinstance(content, dict):
        raise ConversionError(
            f"{path} holds a JSON {type(content).__name__}, not an object; repair or re-download it."
        )
    return content


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; the checkpoint is incomplete (missing shard?).")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # safetensors' own error type for truncated or damaged headers and data
            raise ConversionError(
                f"{path} is not a readable safetensors file ({error}); it is truncated or damaged: re-download it."
            ) from error
    with path.open("rb") as file:
        magic = file.read(4)
    # torch.save writes a zip archive (or, in its legacy format, a pickle, whose first byte is the PROTO opcode).
    if not magic.startswith((b"PK\x03\x04", b"\x80")):
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint (it starts with {magic!r}, neither a zip archive nor a pickle); pass "
            "the checkpoint file itself (re-download it if it was cut short)."
        )
    try:
        try:  # memory-mapped: tensors are read from disk on use, so the weights are never held twice
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():  # a damaged pickle, not a refused object
            raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({error}); re-download it.") from error
        raise ConversionError(
            f"{path} contains Python objects besides tensors, which are never unpickled here; load it in a trusted "
            "session and save only its state dict (`torch.save(checkpoint['state_dict'], 'weights.bin')`)."
        ) from error
    except Exception as error:  # torch.load fails on damaged files with KeyError, EOFError, RuntimeError, …
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({error!r}); re-download it.") from error


def _clean_names(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # Lightning .ckpt
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ConversionError(
            f"{path} holds no state dict (name → tensor); pass a checkpoint of the original EoMT release."
        )
    # torch.compile wraps modules as `_orig_mod`, which shows up anywhere in the names.
    state_dict = {key.replace("_orig_mod.", ""): tensor for key, tensor in checkpoint.items()}
    if not any(key.startswith("network.") for key in state_dict):
        if any(key.startswith(("layers.", "embeddings.")) for key in state_dict):
            hint = "it is already in the Transformers format; load it with `from_pretrained` instead"
        else:
            hint = "pass a checkpoint of the original EoMT release (tue-mps/eomt)"
        example = next(iter(state_dict), "<empty>")
        raise ConversionError(
            f"{path} is not an original EoMT checkpoint: none of its {len(state_dict)} keys start with 'network.' "
            f"(e.g. {example!r}); {hint}."
        )
    return state_dict
