"""Train EoMT with the Trainer: `python -m modeling_eomt.train` / `eomt-train` (the argument dataclasses, `run`, `main`).

    eomt-train --model_name_or_path coco_panoptic_eomt_large_640 --dataset_name /data/coco --task panoptic \
        --output_dir runs/coco --max_steps 88700 --per_device_train_batch_size 4 --fp16 --do_eval

`--model_name_or_path` takes a preset name (architecture only, random weights), a checkpoint folder or a Hub id. A
checkpoint's weights must all fit its config (with any `--config_overrides`); `--adapt_class_head` starts a new class
head when the dataset has another number of classes. Every value of the recipe (EomtTrainingArguments) is a flag;
those left unset come from the backbone family's recipe (`--recipe dinov2|dinov3`, default: the model's).
`--resume_from_checkpoint latest` resumes from the newest complete checkpoint in `--output_dir`.
Under `torchrun --nproc_per_node N` or `accelerate launch` the same script trains with DDP.
Bad arguments, data or checkpoints end the run with one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoConfig, HfArgumentParser, set_seed
from transformers.utils import logging

from ..configuration import PRESETS, TASKS, EomtBaseConfig, EomtConfig, EomtDinov3Config
from ..image_processing import EomtImageProcessor
from ..model_card import build_model_card
from ..modeling import MODEL_CLASSES, EomtForUniversalSegmentation
from .augmentation import TrainTransform
from .callbacks import EpochSeedCallback
from .collators import EvalCollator, SegmentationCollator
from .dataset import SegmentationDataset
from .evaluation import HEADLINE, SegmentationMetrics
from .loading import benchmark_key, load_segmentation_dataset
from .optim import freeze_backbone
from .trainer import EomtTrainer, EomtTrainingArguments

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Preset name (random init), checkpoint folder or Hub id (default: coco_panoptic_eomt_large_640). "
            "With --backbone, a preset only names the queries, input size and recipe."
        },
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "JSON of config fields to override, e.g. '{\"num_queries\": 100}'."}
    )
    adapt_class_head: bool = field(
        default=False,
        metadata={
            "help": "Train a new class head when the checkpoint's number of classes differs from the dataset's "
            "(the only weights allowed not to fit; any other misfit is refused)."
        },
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={"help": "Freeze the ViT (embeddings and blocks); train the queries, final norm and heads only."},
    )
    drop_path_rate: float | None = field(
        default=None, metadata={"help": "Stochastic depth rate of the ViT blocks (default: the config's)."}
    )
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Start from a pretrained DINOv2/DINOv3 backbone: a Hub id or folder in transformers' format "
            "(facebook/dinov2-with-registers-large, facebook/dinov3-vitl16-pretrain-lvd1689m) or a timm DINOv2 "
            "state dict; queries and heads start fresh."
        },
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
    skip_unreadable: bool = field(
        default=False, metadata={"help": "Skip examples whose files cannot be read, with a warning naming each."}
    )


# The architecture trained when neither a model nor a backbone is named.
DEFAULT_PRESET = "coco_panoptic_eomt_large_640"
# Buffers the model derives from its config: a checkpoint without them loses nothing.
_DERIVED_BUFFERS = {"criterion.empty_weight", "attn_mask_probs"}
# Weights that depend on the number of classes: a new class head.
_CLASS_HEAD = ("class_predictor.", "criterion.empty_weight")


def load_model(model_args: ModelArguments, dataset: SegmentationDataset) -> EomtForUniversalSegmentation:
    """The model for `dataset`'s labels: a preset's architecture from scratch, or a checkpoint whose weights must all
    fit (a new class head only with `adapt_class_head`). Config overrides are validated like the config itself."""
    id2label = dict(dataset.id2label)
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    overrides = config_overrides(model_args)
    name = model_args.model_name_or_path
    if model_args.backbone:
        if name is not None and name not in PRESETS:
            raise ValueError(
                f"--backbone starts from a pretrained ViT, but {name} is an EoMT checkpoint (which holds its own ViT); "
                "pass one of them (with --backbone, --model_name_or_path may only name a preset)."
            )
        preset = EomtConfig.from_preset(name) if name else None
        architecture = {"image_size": preset.image_size, "num_queries": preset.num_queries} if preset else {}
        return EomtForUniversalSegmentation.from_backbone(
            model_args.backbone, **{**architecture, **labels, **overrides}
        )
    name = name or DEFAULT_PRESET
    if name in PRESETS:
        config = EomtConfig.from_preset(name, **labels, **overrides)  # the preset's family
        return MODEL_CLASSES[config.model_type](config)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise OSError(
            f"{name} is neither a preset ({', '.join(sorted(PRESETS)[:3])}, ...) nor a checkpoint folder or Hub id "
            f"that could be read: {str(error).strip().splitlines()[0]}"
        ) from error
    if not isinstance(config, EomtBaseConfig):
        raise TypeError(f"{name} is not an EoMT checkpoint (model type {config.model_type!r}).")
    config = type(config).from_dict({**config.to_dict(), **labels, **overrides})  # runs the config's checks
    model, info = MODEL_CLASSES[config.model_type].from_pretrained(
        name, config=config, ignore_mismatched_sizes=True, output_loading_info=True, allow_missing_weights=True
    )
    mismatched = {key: (tuple(old), tuple(new)) for key, old, new in info["mismatched_keys"]}
    allowed = _CLASS_HEAD if model_args.adapt_class_head else ()
    misfits = [
        f"{key} {old} in the checkpoint, {new} here"
        for key, (old, new) in sorted(mismatched.items())
        if not key.startswith(allowed)
    ]
    misfits += [f"{key} missing" for key in sorted(set(info["missing_keys"]) - _DERIVED_BUFFERS)]
    misfits += [f"{key} not used" for key in sorted(info["unexpected_keys"])]
    if not misfits:
        return model
    if all(misfit.startswith(_CLASS_HEAD) for misfit in misfits):
        raise ValueError(
            f"{name} has a class head for another number of classes than the dataset's {len(id2label)}; pass "
            "--adapt_class_head to train a new class head for the dataset's classes."
        )
    raise ValueError(
        f"{len(misfits)} weight(s) of {name} do not fit its config and would train from random "
        f"({'; '.join(misfits[:3])}{'; ...' if len(misfits) > 3 else ''}); drop the --config_overrides that change "
        "the architecture, or start from a preset."
    )


def config_overrides(model_args: ModelArguments) -> dict:
    """`--config_overrides` (JSON) and `--drop_path_rate` as config fields; unknown fields are an error."""
    try:
        overrides = dict(json.loads(model_args.config_overrides or "{}"))
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"--config_overrides must be a JSON object of config fields ({error}): {model_args.config_overrides}"
        ) from error
    if model_args.drop_path_rate is not None:
        overrides["drop_path_rate"] = model_args.drop_path_rate
    unknown = sorted(set(overrides) - set(EomtConfig().to_dict()) - set(EomtDinov3Config().to_dict()))
    if unknown:
        raise ValueError(
            f"--config_overrides: {', '.join(unknown)} not a field of EomtConfig or EomtDinov3Config (see their "
            "docstrings)."
        )
    return overrides


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
    train_raw.skip_unreadable = data_args.skip_unreadable
    model = load_model(model_args, train_raw)
    model.set_selective_recompute(True)  # less activation memory for a few percent more compute (recompute.py)
    if model_args.freeze_backbone:
        freeze_backbone(model)
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
        eval_dataset.skip_unreadable = data_args.skip_unreadable
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
    metrics, results = {}, {}
    if training_args.do_train:
        results["train"] = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics
    if eval_dataset is not None:
        results["eval"] = trainer.evaluate()
    for split_metrics in results.values():
        metrics.update(split_metrics)

    def write_processor_and_card(folder: Path) -> None:
        processor.save_pretrained(folder)
        headline = HEADLINE[data_args.task]
        card = build_model_card(
            model.config,
            data_args.task,
            dataset=benchmark_key(data_args.dataset_name, data_args.task) or data_args.dataset_name,
            metrics={headline: round(100 * metrics[f"eval_{headline}"], 2)} if eval_dataset else None,
            model_name=Path(training_args.output_dir).name,
            notes=f"Trained with `eomt-train` on `{data_args.dataset_name}`.",
            base_backbone=model_args.backbone,
        )
        (folder / "README.md").write_text(card)

    trainer.save_model_staged(training_args.output_dir, write_processor_and_card)
    # Written after the model: `eval_results.json` marks a finished run (the demo's cache relies on it).
    for split, split_metrics in results.items():
        trainer.save_metrics(split, split_metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`eomt-train`: 0 on success; 2 with one line on stderr for bad arguments, data or checkpoints."""
    parser = HfArgumentParser((ModelArguments, DataArguments, EomtTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        metrics = run(model_args, data_args, training_args)
    except (ValueError, TypeError, OSError) as error:
        logger.debug("eomt-train failed", exc_info=True)  # the traceback, with TRANSFORMERS_VERBOSITY=debug
        # On its own line even when an interrupted progress bar holds the cursor.
        tqdm.write(f"eomt-train: error: {one_line(error)}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


def one_line(error: BaseException) -> str:
    """The message of `error` in one line; for an error raised in a DataLoader worker, the original one."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "Original Traceback" in lines[0] or (len(lines) > 1 and "Original Traceback" in lines[1]):
        return lines[-1].split(": ", 1)[-1]  # "package.Error: message" -> "message"
    return lines[0]


if __name__ == "__main__":
    sys.exit(main())
