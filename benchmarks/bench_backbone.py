"""A small pretrained backbone for `from_backbone` comparisons: a DINOv2-format ViT pretrained on `shapes` images.

    python benchmarks/bench_backbone.py [--output demo_output/shapes_dinov2] [--steps 350] [--quick]

The proxy task is masked patch prediction (self-supervised, no labels): half of the patches are replaced by DINOv2's
own mask token and a linear head predicts their pixels from the last hidden states (MAE without its decoder). The ViT has the demo
EoMT's width and depth at DINOv2's patch size 14 and 112 pixels, the 8×8 grid the demo's patch 16 at 128 pixels
gives, so `from_backbone(folder, image_size=128)` takes the paper's path: the 14×14 kernel resampled to 16×16. The
folder is written in the transformers DINOv2-with-registers format.

Prints the held-out masked-patch loss of the pretrained ViT as a ratio to the untrained one's on the same images. (A
linear per-patch class probe cannot judge the features here: on `shapes`, whose classes have their own colours, an
untrained ViT's patch tokens already reach 98 %.)
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from modeling_eomt.configuration import IMAGENET_MEAN, IMAGENET_STD
from torch import nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from modeling_eomt.training.shapes import render_shapes_example

# The demo EoMT's trunk (modeling_eomt/training/demo.py) at DINOv2's patch size; same 8×8 grid.
BACKBONE = {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "num_register_tokens": 4}
IMAGE_SIZE, PATCH_SIZE = 112, 14
QUICK = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_register_tokens": 4}
MASK_RATIO = 0.5


def render_images(count: int, seed: int, image_size: int) -> torch.Tensor:
    """`count` shapes images, normalised with the ImageNet statistics, `(count, 3, S, S)`."""
    images = torch.stack([render_shapes_example(i, seed=seed, image_size=image_size)["image"] for i in range(count)])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def patch_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pixels of each patch `(B, N, 3·p·p)`. Unlike MAE, not normalised per patch: on `shapes` a patch's mean colour
    is what tells the classes apart, so the ViT must keep it."""
    return F.unfold(images, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def masked_patch_loss(
    backbone: Dinov2WithRegistersModel, head: nn.Linear, images: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Mean squared error of the predicted pixels of a random half of the patches, which the ViT sees masked."""
    config = backbone.config
    targets = patch_targets(images, config.patch_size)
    masked = torch.rand(targets.shape[:2], generator=generator) < MASK_RATIO
    hidden = backbone(images, bool_masked_pos=masked).last_hidden_state[:, 1 + config.num_register_tokens :]
    return F.mse_loss(head(hidden)[masked], targets[masked])


def pretrain(
    architecture: dict, steps: int, batch_size: int = 16, pool: int = 512, seed: int = 0
) -> tuple[Dinov2WithRegistersModel, float, float]:
    """A DINOv2-with-registers ViT pretrained by masked patch prediction on `shapes`; with the held-out loss of the
    untrained and of the pretrained ViT (same images, same masks)."""
    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(**architecture, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    backbone = Dinov2WithRegistersModel(config)
    head = nn.Linear(config.hidden_size, 3 * PATCH_SIZE**2)
    train_images, held_out = render_images(pool, seed, IMAGE_SIZE), render_images(64, seed + 1, IMAGE_SIZE)

    def held_out_loss() -> float:
        backbone.eval()
        with torch.no_grad():
            return masked_patch_loss(backbone, head, held_out, torch.Generator().manual_seed(seed)).item()

    before = held_out_loss()
    parameters = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.05)
    warmup = max(1, steps // 10)  # linear warmup, then cosine decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    backbone.train()
    for _ in range(steps):
        batch = train_images[torch.randint(pool, (batch_size,), generator=generator)]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        loss = masked_patch_loss(backbone, head, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    return backbone, before, held_out_loss()


def save_backbone(backbone: Dinov2WithRegistersModel, folder: Path) -> Path:
    """Write `backbone` in the transformers format to `folder`: staged beside it, then renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        backbone.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = staging.with_name(f"{staging.name}.previous")
    if folder.exists():  # moved aside, not deleted, until the new folder is in place
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("demo_output/shapes_dinov2"))
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--quick", action="store_true", help="a tiny ViT for a few steps (a smoke test)")
    args = parser.parse_args(argv)
    architecture, steps, pool = (QUICK, 3, 16) if args.quick else (BACKBONE, args.steps, 512)

    start = time.process_time()
    backbone, before, after = pretrain(architecture, steps, pool=pool)
    folder = save_backbone(backbone, args.output)
    print(f"pretrained for {steps} steps in {time.process_time() - start:.0f} s of CPU time; saved to {folder}")
    print(f"held-out masked-patch loss: {after:.3f} vs {before:.3f} untrained (ratio {after / before:.2f})")


if __name__ == "__main__":
    main()
