"""`make demo`: train a small EoMT on the synthetic `shapes` set with the Trainer, evaluate PQ, and segment held-out
images through `pipeline("image-segmentation")`, writing overlay PNGs. Offline, a few CPU minutes.

Demo-specific settings (the recipe's defaults target fine-tuning a pretrained DINOv2 for tens of thousands of
steps; this model starts from random weights and gets a few hundred): a ViT of width 192 and 6 blocks at 128 px,
20 queries, 1024 loss points, lr 1e-3 with no layer-wise decay (every layer is new), a 50-step warmup for the
head with the backbone starting right after it, and gradient clipping at 1.0. Masked attention is annealed over the
run exactly as in the recipe. The trained model is cached in `demo_output/model`; a second run goes straight to
inference (pass `--retrain` to train again).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import pipeline

from ..visualize import draw_overlay
from .shapes import SHAPES_ID2LABEL, render_shapes_example
from .train import DataArguments, ModelArguments, run
from .trainer import EomtTrainingArguments

DEMO_MODEL = {
    "hidden_size": 192,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "num_blocks": 2,
    "image_size": 128,
    "num_queries": 20,
    "train_num_points": 1024,
}
PQ_TARGET = 0.7


def train_demo_model(model_dir: Path, max_steps: int, eval_images: int) -> dict:
    model_args = ModelArguments("coco_panoptic_eomt_small_640_2x", config_overrides=json.dumps(DEMO_MODEL))
    data_args = DataArguments(
        dataset_name="shapes",
        task="panoptic",
        image_size=128,
        scale_min=0.8,
        scale_max=1.25,
        max_train_samples=max_steps * 8,
        max_eval_samples=eval_images,
    )
    training_args = EomtTrainingArguments(
        output_dir=str(model_dir),
        do_train=True,
        do_eval=True,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        layer_decay=1.0,
        head_warmup_steps=50,
        backbone_warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )
    return run(model_args, data_args, training_args)


def segment_held_out(model_dir: Path, out_dir: Path, count: int) -> list[Path]:
    """Run the pipeline on held-out shapes images (a seed never used in training) and write overlays."""
    segmenter = pipeline("image-segmentation", model=str(model_dir), device="cpu")
    label2id = {name: index for index, name in SHAPES_ID2LABEL.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        pixels = render_shapes_example(index, seed=99, image_size=128)["image"]
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        segments = segmenter(image, subtask="panoptic", threshold=0.8)
        segmentation = np.full((image.height, image.width), -1, dtype=np.int64)
        segments_info = []
        for segment_id, segment in enumerate(segments):
            segmentation[np.array(segment["mask"]) > 0] = segment_id
            segments_info.append({"id": segment_id, "label_id": label2id[segment["label"]], "score": segment["score"]})
        # Drawn 3x larger so that labels and legend stay readable on 128-px images.
        big = image.resize((3 * image.width, 3 * image.height), Image.NEAREST)
        path = out_dir / f"shapes_{index:02d}.png"
        draw_overlay(big, segmentation.repeat(3, 0).repeat(3, 1), segments_info, SHAPES_ID2LABEL).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--overlays", type=int, default=8)
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args(argv)

    model_dir = args.output / "model"
    metrics_file = model_dir / "eval_results.json"
    if args.retrain or not metrics_file.exists():
        print(f"Training a small EoMT on `shapes` for {args.max_steps} steps (cached in {model_dir}) ...")
        train_demo_model(model_dir, args.max_steps, args.eval_images)
    else:
        print(f"Using the cached model in {model_dir} (pass --retrain to train again).")
    pq = json.loads(metrics_file.read_text())["eval_pq"]
    overlays = segment_held_out(model_dir, args.output / "overlays", args.overlays)
    print(f"PQ on {args.eval_images} held-out shapes images: {pq:.3f} (target ≥ {PQ_TARGET})")
    print(f"Overlays: {len(overlays)} PNGs in {overlays[0].parent}")


if __name__ == "__main__":
    main()
