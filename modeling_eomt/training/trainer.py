"""The EoMT Trainer and its arguments.

[`EomtTrainer`] trains with the recipe's optimizer and schedule (`optim.py`) from [`EomtTrainingArguments`] and the
masked-attention annealing callback (`callbacks.py`). Given an `eval_collator` ([`EvalCollator`]) and a
[`SegmentationMetrics`] as `compute_metrics`, its evaluation feeds processor-prepared images to the model and
reports the task's metrics (PQ, mIoU or mask AP).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .callbacks import AttnMaskAnnealingCallback
from .checkpoints import STAGING_DIR, checkpoint_problem, latest_complete_checkpoint, publish, replace_folder
from .evaluation import SegmentationMetrics
from .optim import build_optimizer, build_scheduler, unwrap_model


@dataclass(frozen=True)
class Recipe:
    """The training values that differ between backbone families (the original release's configs)."""

    learning_rate: float
    head_warmup_steps: int
    backbone_warmup_steps: int
    layer_decay: float
    # The last `num_blocks` blocks (those with masked attention) train at the full lr, outside the layer decay.
    full_lr_last_blocks: bool
    # The first masked block anneals over steps 0 -> this (see `default_annealing_steps`); None: the scaled window.
    attn_mask_annealing_first_block_end: int | None


RECIPES = {
    "dinov2": Recipe(1e-4, 500, 1000, 0.8, full_lr_last_blocks=False, attn_mask_annealing_first_block_end=None),
    "dinov3": Recipe(2e-4, 2000, 3000, 0.8, full_lr_last_blocks=True, attn_mask_annealing_first_block_end=3000),
}
# Each model type's backbone family.
RECIPE_OF_MODEL_TYPE = {"eomt": "dinov2", "eomt_dinov3": "dinov3"}
# (recipe, benchmark) -> values that differ there: the DINOv3 release trains ADE20K semantic without layer decay.
RECIPE_EXCEPTIONS = {("dinov3", "ade20k_semantic"): {"layer_decay": 1.0}}


@dataclass
class EomtTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` with the EoMT recipe's defaults (weight decay 0.05, gradient clip 0.01, seed 0) and its extra
    knobs. The values of a [`Recipe`] (learning rate, warmups, layer decay, ...) left unset come from `recipe`, or from
    the model's backbone family (DINOv2 for model type "eomt", DINOv3 for "eomt_dinov3"), when [`EomtTrainer`] starts
    ([`apply_recipe`]). `lr_scheduler_type` and `warmup_steps` are not used by [`EomtTrainer`]: the schedule is the
    recipe's two-stage warmup + poly decay.
    """

    seed: int = field(default=0, metadata={"help": "Random seed (the recipe's is 0)."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every parameter gets a gradient at every step, so DDP need not search."}
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Backbone family whose recipe fills the values left unset (default: the model's).",
            "choices": tuple(RECIPES),
        },
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the head and the last block (DINOv2 1e-4, DINOv3 2e-4)."},
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay, applied to every parameter."})
    max_grad_norm: float = field(default=0.01, metadata={"help": "Gradient clipping norm (the recipe uses 0.01)."})
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise lr decay: block i of L gets lr * layer_decay ** (L - 1 - i) (recipe: 0.8)."},
    )
    full_lr_last_blocks: bool | None = field(
        default=None,
        metadata={"help": "Train the masked blocks (the last num_blocks) at the full lr (DINOv2: no, DINOv3: yes)."},
    )
    head_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Linear warmup of the head; the backbone stays at lr 0 meanwhile (DINOv2 500, DINOv3 2000)."
        },
    )
    backbone_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Linear warmup of the backbone after the head's warmup (DINOv2 1000, DINOv3 3000)."},
    )
    poly_power: float = field(default=0.9, metadata={"help": "Power of the polynomial decay after warmup."})
    attn_mask_annealing: bool = field(
        default=True, metadata={"help": "Anneal the masked-attention probabilities during training."}
    )
    attn_mask_annealing_starts: list[int] | None = field(
        default=None, metadata={"help": "Annealing start step per masked block (default: scaled from max_steps)."}
    )
    attn_mask_annealing_ends: list[int] | None = field(
        default=None, metadata={"help": "Annealing end step per masked block (default: scaled from max_steps)."}
    )
    attn_mask_annealing_first_block_end: int | None = field(
        default=None,
        metadata={"help": "Default windows only: the first masked block anneals over steps 0 -> this (DINOv3: 3000)."},
    )
    attn_mask_annealing_power: float = field(default=0.9, metadata={"help": "Power of the annealing decay."})

    def apply_recipe(self, model_type: str, dataset_key: str | None = None) -> None:
        """
        Fill the [`Recipe`] values left unset from `recipe`, or, if that is unset too, from the backbone family of
        `model_type`. `dataset_key` (a key of `configuration.labels`, e.g. `"ade20k_semantic"`) selects the recipe's
        values for that benchmark. Values already set are kept, so calling it again changes nothing.
        """
        if self.recipe is None:
            if model_type not in RECIPE_OF_MODEL_TYPE:
                raise ValueError(
                    f"No training recipe for model type {model_type!r}; pass --recipe {' or '.join(RECIPES)}."
                )
            self.recipe = RECIPE_OF_MODEL_TYPE[model_type]
        if self.recipe not in RECIPES:
            raise ValueError(f"Unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}.")
        values = {**asdict(RECIPES[self.recipe]), **RECIPE_EXCEPTIONS.get((self.recipe, dataset_key), {})}
        for name, value in values.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def __post_init__(self) -> None:
        if not torch.accelerator.is_available():
            # Pinned memory only speeds up copies to an accelerator; without one, torch warns in every data loader.
            self.dataloader_pin_memory = False
            # Without `use_cpu`, accelerate runs a CPU-only torchrun as independent processes: no DDP wrapper, no
            # gradient averaging, each process training its own model.
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                self.use_cpu = True
        super().__post_init__()


class EomtTrainer(Trainer):
    """
    A `Trainer` running the EoMT recipe: [`build_optimizer_and_scheduler`] from [`EomtTrainingArguments`] and, unless
    `attn_mask_annealing=False`, an [`AttnMaskAnnealingCallback`].

    Checkpoints are staged (written into `output_dir/.staging/`, then renamed), and `resume_from_checkpoint=True`
    (or `"latest"`) resumes from the newest complete checkpoint, skipping incomplete ones with a warning.

    Args:
        eval_collator (`Callable`, *optional*):
            Collator of the evaluation batches (e.g. [`EvalCollator`], which prepares raw images with the processor as
            at inference and carries the targets); the training batches use `data_collator`. Defaults to
            `data_collator`.
        compute_metrics ([`SegmentationMetrics`], *optional*):
            With an `eval_collator` that yields `targets`, evaluation post-processes each batch where it is
            predicted and reports the task's metrics. The prediction step then returns no predictions
            (`predict()` gives metrics only).
        args, kwargs:
            As for `Trainer`; `args` must be [`EomtTrainingArguments`].
    """

    def __init__(self, *args, eval_collator: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, EomtTrainingArguments):
            raise TypeError(
                f"EomtTrainer needs EomtTrainingArguments (got {type(self.args).__name__}); build the arguments with "
                "`EomtTrainingArguments(...)` or parse them with `HfArgumentParser(EomtTrainingArguments)`."
            )
        if self.compute_metrics is not None and not isinstance(self.compute_metrics, SegmentationMetrics):
            raise TypeError(
                f"EomtTrainer evaluates with SegmentationMetrics, got compute_metrics="
                f"{type(self.compute_metrics).__name__}; pass SegmentationMetrics(processor, task, id2label, ...)."
            )
        self.eval_collator = eval_collator
        self._staging = False
        self.args.apply_recipe(unwrap_model(self.model).config.model_type)
        has_annealing = any(isinstance(cb, AttnMaskAnnealingCallback) for cb in self.callback_handler.callbacks)
        if self.args.attn_mask_annealing and not has_annealing:
            self.add_callback(
                AttnMaskAnnealingCallback(
                    starts=self.args.attn_mask_annealing_starts,
                    ends=self.args.attn_mask_annealing_ends,
                    power=self.args.attn_mask_annealing_power,
                    first_block_end=self.args.attn_mask_annealing_first_block_end,
                )
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "latest"):
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
            resume_from_checkpoint = str(resume_from_checkpoint)
        elif resume_from_checkpoint:
            problem = checkpoint_problem(Path(resume_from_checkpoint))
            if problem is not None:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, the Trainer writes it into the staging folder (see `_save_checkpoint`).
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = Path(run_dir, STAGING_DIR, name), Path(run_dir, name)
        if self.args.should_save and staged.exists():  # left by a run killed while saving this step
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        if self.args.should_save:
            if self.state.best_model_checkpoint == str(staged):
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(staged / "trainer_state.json"))
            replace_folder(staged, final)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def save_model_staged(self, output_dir: str, extra: Callable[[Path], None] | None = None) -> None:
        """`save_model` into `output_dir` through a staging folder, renamed in file by file with the weights last;
        `extra(folder)` writes more files into the staging folder first (the processor, a model card)."""
        staging = Path(output_dir, STAGING_DIR, "final")
        if self.args.should_save and staging.exists():  # left by a run killed while saving
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self.save_model(str(staging))  # every process takes part (FSDP gathers the weights)
        if self.args.should_save:
            if extra is not None:
                extra(staging)
            publish(staging, Path(output_dir))
        self.accelerator.wait_for_everyone()

    def _get_collator_with_removed_columns(self, data_collator: Callable, description: str | None = None) -> Callable:
        # The one place where the Trainer picks the collator of a loader it builds: evaluation and prediction
        # loaders take `eval_collator`, the training loader `data_collator`.
        if description != "Training" and self.eval_collator is not None:
            data_collator = self.eval_collator
        return super()._get_collator_with_removed_columns(data_collator, description)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                self.model if model is None else model,
                self.args.learning_rate,
                self.args.weight_decay,
                self.args.layer_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                full_lr_blocks=unwrap_model(self.model).config.num_blocks if self.args.full_lr_last_blocks else 0,
            )
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(
                self.optimizer if optimizer is None else optimizer,
                num_training_steps,
                self.args.head_warmup_steps,
                self.args.backbone_warmup_steps,
                self.args.poly_power,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "targets" not in inputs:  # training-style batches: the Trainer's loss-only evaluation
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        targets = inputs.pop("targets")
        with torch.no_grad():
            outputs = model(**inputs)
        if self.compute_metrics is not None:
            # Post-processed where predicted, then gathered as whole images (padding duplicates dropped). The
            # Trainer's own gathering of predictions and labels would pad and cut the targets' tensors.
            records = self.compute_metrics.encode(outputs, targets)
            self.compute_metrics.add(self.accelerator.gather_for_metrics(records, use_gather_object=True))
        return None, None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        if self.compute_metrics is not None:
            self.compute_metrics.reset()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.compute_metrics is not None:
            metrics = self.compute_metrics.compute()
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output
