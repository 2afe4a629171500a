"""Tiny EoMTs shared by the tests: `tiny_model` for training tests (3 ViT blocks of width 32 at 32 px; a few ms per
step), `TINY` config fields of the model tests (64 px, 2 query blocks), and `stock_logits`, the logits transformers'
built-in classes compute for a saved folder in a process that never imported us."""

import subprocess
import sys
from pathlib import Path

import torch

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation

NUM_LAYERS = 3


def tiny_model(num_blocks: int = 2) -> EomtForUniversalSegmentation:
    torch.manual_seed(0)
    config = EomtConfig(
        hidden_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        image_size=32,
        num_blocks=num_blocks,
        num_queries=4,
        num_labels=3,
        train_num_points=64,
    )
    return EomtForUniversalSegmentation(config)


TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_blocks": 2,
    "image_size": 64,
    "num_queries": 6,
    "num_labels": 5,
    "num_register_tokens": 2,
}


def stock_logits(folder: Path, builtin_class: str, seed: int = 0) -> torch.Tensor:
    """Mask logits of `transformers.models.<builtin_class>` loaded from `folder` (no missing, unexpected or
    mismatched keys allowed) on `torch.randn(1, 3, 64, 64)` drawn after `torch.manual_seed(seed)`."""
    module, name = builtin_class.rsplit(".", 1)
    output = folder / "stock_logits.pt"
    script = f"""
import torch, transformers.models.{module} as builtin
model, info = builtin.{name}.from_pretrained({str(folder)!r}, output_loading_info=True)
assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
torch.manual_seed({seed})
with torch.no_grad():
    torch.save(model.eval()(torch.randn(1, 3, 64, 64)).masks_queries_logits, {str(output)!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    return torch.load(output, weights_only=True)
