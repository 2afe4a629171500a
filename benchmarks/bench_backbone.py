"""A small pretrained backbone for `from_backbone` comparisons: a DINOv2-format ViT pretrained on `shapes` images.

    python benchmarks/bench_backbone.py [--output demo_output/shapes_dinov2] [--steps 300] [--quick]

The proxy task is supervised patch classification: a linear head on the last hidden states predicts the class that
covers most of each patch, on images of another seed than the demo's training and evaluation sets. The ViT has the
demo EoMT's width and depth at DINOv2's patch size 14 and 112 pixels, the 8×8 grid the demo's patch 16 at 128 pixels
gives, so `from_backbone(folder, image_size=128)` takes the paper's path: the 14×14 kernel resampled to 16×16. The
folder is written in the transformers DINOv2-with-registers format.

Prints the held-out patch accuracy of the pretrained ViT and, as the baseline, of the untrained one with the same head
training budget (a linear probe of its random features).
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

from modeling_eomt.training.shapes import SHAPES_ID2LABEL, render_shapes_example

# The demo EoMT's trunk (modeling_eomt/training/demo.py) at DINOv2's patch size; same 8×8 grid.
BACKBONE = {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "num_register_tokens": 4}
IMAGE_SIZE, PATCH_SIZE = 112, 14
QUICK = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_register_tokens": 4}
BATCH_SIZE = 16


def render_images(count: int, seed: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` shapes images normalised with the ImageNet statistics `(count, 3, S, S)`, and the class covering most
    of each patch `(count, N)`."""
    images, labels = [], []
    for index in range(count):
        example = render_shapes_example(index, seed=seed, image_size=image_size)
        images.append(example["image"])
        # Segments do not overlap: one class per pixel.
        semantic = (example["masks"].long() * example["class_labels"].view(-1, 1, 1)).sum(0)
        shares = F.avg_pool2d(F.one_hot(semantic, len(SHAPES_ID2LABEL)).permute(2, 0, 1).float(), PATCH_SIZE)
        labels.append(shares.flatten(1).argmax(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (torch.stack(images).float() / 255 - mean) / std, torch.stack(labels)


def patch_logits(backbone: Dinov2WithRegistersModel, head: nn.Linear, images: torch.Tensor) -> torch.Tensor:
    """Class logits of every patch `(B, N, classes)` from the final normalised patch tokens."""
    return head(backbone(images).last_hidden_state[:, 1 + backbone.config.num_register_tokens :])


def train_patch_classifier(
    backbone: Dinov2WithRegistersModel, images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int
) -> nn.Linear:
    """Train a fresh linear head, and the backbone unless it is frozen (`requires_grad_(False)`), for `steps` steps of
    AdamW (batches of 16, horizontal flips; warmup, then cosine decay). Returns the head."""
    torch.manual_seed(seed)
    head = nn.Linear(backbone.config.hidden_size, len(SHAPES_ID2LABEL))
    parameters = [p for p in (*backbone.parameters(), *head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.05)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    grid = math.isqrt(labels.shape[1])
    backbone.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (BATCH_SIZE,), generator=generator)
        batch_images, batch_labels = images[batch], labels[batch]
        # A horizontal flip mirrors the patch grid too.
        if torch.rand((), generator=generator) < 0.5:
            batch_images = batch_images.flip(-1)
            batch_labels = batch_labels.view(-1, grid, grid).flip(-1).flatten(1)
        loss = F.cross_entropy(patch_logits(backbone, head, batch_images).flatten(0, 1), batch_labels.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    backbone.eval()
    return head


def patch_accuracy(
    backbone: Dinov2WithRegistersModel, head: nn.Linear, images: torch.Tensor, labels: torch.Tensor
) -> float:
    with torch.no_grad():
        return (patch_logits(backbone, head, images).argmax(-1) == labels).float().mean().item()


def pretrain(
    architecture: dict, steps: int, pool: int = 512, seed: int = 1000
) -> tuple[Dinov2WithRegistersModel, dict]:
    """A DINOv2-with-registers ViT pretrained by patch classification on `shapes` (seed `seed`, not the demo's); with
    the held-out patch accuracy of it and of a linear probe of the untrained ViT, trained for as many steps."""
    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(**architecture, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    untrained, backbone = Dinov2WithRegistersModel(config), Dinov2WithRegistersModel(config)
    backbone.load_state_dict(untrained.state_dict())
    images, labels = render_images(pool, seed, IMAGE_SIZE)
    held_out = render_images(64, seed + 1, IMAGE_SIZE)
    head = train_patch_classifier(backbone, images, labels, steps, seed)
    probe = train_patch_classifier(untrained.requires_grad_(False), images, labels, steps, seed)
    accuracy = {
        "pretrained": patch_accuracy(backbone, head, *held_out),
        "untrained": patch_accuracy(untrained, probe, *held_out),
    }
    return backbone, accuracy


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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a tiny ViT for a few steps (a smoke test)")
    args = parser.parse_args(argv)
    architecture, steps, pool = (QUICK, 3, 16) if args.quick else (BACKBONE, args.steps, 512)

    start = time.process_time()
    backbone, accuracy = pretrain(architecture, steps, pool=pool)
    folder = save_backbone(backbone, args.output)
    print(f"pretrained for {steps} steps in {time.process_time() - start:.0f} s of CPU time; saved to {folder}")
    ratio = (1 - accuracy["pretrained"]) / (1 - accuracy["untrained"])
    print(
        f"held-out patch accuracy: {accuracy['pretrained']:.3f} vs {accuracy['untrained']:.3f} for a linear probe of "
        f"the untrained ViT (error ratio {ratio:.2f})"
    )


if __name__ == "__main__":
    main()
