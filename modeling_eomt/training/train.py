"""Train EoMT with the Trainer: `python -m modeling_eomt.train` / `eomt-train` (the argument dataclasses, `run`, `main`).

    eomt-train --model_name_or_path coco_panoptic_eomt_large_640 --dataset_name /data/coco --task panoptic \
        --output_dir runs/coco --max_steps 88700 --per_device_train_batch_size 4 --fp16 --do_eval

`--model_name_or_path` takes a preset name (architecture only, random weights), a checkpoint folder or a Hub id; the
class head and `id2label` are adapted to the dataset. Every value of the recipe (EomtTrainingArguments) is a flag;
those left unset come from the backbone family's recipe (`--recipe dinov2|dinov3`, default: the model's).
Under `torchrun --nproc_per_node N` or `accelerate launch` the same script trains with DDP.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, set_seed
from transformers.utils import logging

from ..configuration import PRESETS, TASKS, EomtConfig
from ..image_processing import EomtImageProcessor
from ..model_card import build_model_card
from ..modeling import EomtForUniversalSegmentation
from .augmentation import TrainTransform
from .callbacks import EpochSeedCallback
from .collators import EvalCollator, SegmentationCollator
from .dataset import SegmentationDataset
from .evaluation import HEADLINE, SegmentationMetrics
from .loading import benchmark_key, load_segmentation_dataset
from .trainer import EomtTrainer, EomtTrainingArguments

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="coco_panoptic_eomt_large_640",
        metadata={"help": "Preset name (random init), checkpoint folder or Hub id."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "JSON of config fields to override, e.g. '{\"num_queries\": 100}'."}
    )


@dataclass
class DataArguments:
    dataset_name: str = field(default="shapes", metadata={"help": "Hub dataset id, local path, or `shapes`."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    task: str = field(default="panoptic", metadata={"help": "panoptic, instance or semantic.", "choices": TASKS})
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    image_size: int | None = field(
        default=None, metadata={"help": "Training crop / eval size (default: the model's)."}
    )
    scale_min: float = field(default=0.1, metadata={"help": "Large-scale jitter lower bound (ADE/Cityscapes: 0.5)."})
    scale_max: float = field(default=2.0, metadata={"help": "Large-scale jitter upper bound."})
    flip_probability: float = field(default=0.5)
    color_jitter: bool = field(default=False, metadata={"help": "Photometric jitter (recipe: ADE20K, Cityscapes)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    panoptic_threshold: float = field(default=0.8, metadata={"help": "Score threshold of panoptic evaluation."})


def load_model(model_args: ModelArguments, dataset: SegmentationDataset) -> EomtForUniversalSegmentation:
    """The model for `dataset`'s labels: a preset's architecture from scratch, or a checkpoint with its head adapted."""
    id2label = dict(dataset.id2label)
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    overrides = json.loads(model_args.config_overrides or "{}")
    if model_args.model_name_or_path in PRESETS:
        return EomtForUniversalSegmentation(
            EomtConfig.from_preset(model_args.model_name_or_path, **labels, **overrides)
        )
    return EomtForUniversalSegmentation.from_pretrained(
        model_args.model_name_or_path, ignore_mismatched_sizes=True, **labels, **overrides
    )


def subset(dataset: SegmentationDataset, limit: int | None) -> SegmentationDataset:
    return dataset if limit is None or limit >= len(dataset) else dataset.select(range(limit))


def run(model_args: ModelArguments, data_args: DataArguments, training_args: EomtTrainingArguments) -> dict:
    """Train (and evaluate if asked); save model, processor, metrics and a model card into `output_dir`."""
    set_seed(training_args.seed)  # before building the model, so a fresh head is the same in every run
    load = {
        "name_or_path": data_args.dataset_name,
        "task": data_args.task,
        "dataset_config_name": data_args.dataset_config_name,
    }
    train_raw = subset(load_segmentation_dataset(split=data_args.train_split, **load), data_args.max_train_samples)
    model = load_model(model_args, train_raw)
    size = data_args.image_size or model.config.image_size
    processor = EomtImageProcessor.for_task(data_args.task, size)
    transform = TrainTransform(
        size, (data_args.scale_min, data_args.scale_max), data_args.flip_probability, data_args.color_jitter
    )
    train_dataset = train_raw.with_transform(transform, seed=training_args.seed)

    eval_dataset = compute_metrics = None
    if training_args.do_eval or training_args.eval_strategy != "no":
        eval_dataset = subset(
            load_segmentation_dataset(split=data_args.eval_split, **load), data_args.max_eval_samples
        )
        compute_metrics = SegmentationMetrics(
            processor, data_args.task, train_raw.id2label, train_raw.stuff_ids, data_args.panoptic_threshold
        )
    training_args.remove_unused_columns = False  # the collators read the examples' own fields
    training_args.apply_recipe(model.config.model_type, benchmark_key(data_args.dataset_name, data_args.task))

    trainer = EomtTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=SegmentationCollator(processor.image_mean, processor.image_std),
        eval_collator=EvalCollator(processor),
        compute_metrics=compute_metrics,
        callbacks=[EpochSeedCallback(train_dataset)],
    )
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_metrics("train", result.metrics)
        metrics.update(result.metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_model(training_args.output_dir)  # every rank takes part (FSDP gathers the weights)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        headline = (
            {HEADLINE[data_args.task]: round(100 * metrics[f"eval_{HEADLINE[data_args.task]}"], 2)}
            if eval_dataset
            else None
        )
        dataset = benchmark_key(data_args.dataset_name, data_args.task) or data_args.dataset_name
        card = build_model_card(
            model.config,
            data_args.task,
            dataset=dataset,
            metrics=headline,
            model_name=Path(training_args.output_dir).name,
            notes=f"Trained with `eomt-train` on `{data_args.dataset_name}`.",
        )
        (Path(training_args.output_dir) / "README.md").write_text(card)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, EomtTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    metrics = run(model_args, data_args, training_args)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
