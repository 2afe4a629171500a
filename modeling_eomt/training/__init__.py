"""
Training EoMT with the 🤗 Trainer. The path of one example, module by module:

    loading.py      load_segmentation_dataset: picks the source of a name or path
    coco.py · folders.py · hub.py · shapes.py
                    the sources (COCO files; semantic folders and Cityscapes; `datasets` tables; synthetic shapes),
                    each decoding its records with annotations.py into the common form of dataset.py
    augmentation.py TrainTransform: the recipe's augmentation
    collators.py    SegmentationCollator (training batches), EvalCollator (evaluation through the processor)
    optim.py        the recipe's optimizer and schedule, pure functions
    callbacks.py    masked-attention annealing, epoch seeding of the augmentation
    checkpoints.py  staged saving, resumable-checkpoint checks
    trainer.py      EomtTrainer, EomtTrainingArguments and the recipes per backbone family
    evaluation.py   SegmentationMetrics: PQ, mIoU or mask AP inside the Trainer's evaluation
    train.py        the `eomt-train` script: argument dataclasses, `run`, `main`
"""

from .augmentation import TrainTransform, photometric_jitter
from .callbacks import AttnMaskAnnealingCallback, EpochSeedCallback, annealing_probs, default_annealing_steps
from .collators import EvalCollator, SegmentationCollator
from .dataset import Example, SegmentationDataset, UnreadableSampleError
from .evaluation import HEADLINE, SegmentationMetrics
from .loading import benchmark_key, load_segmentation_dataset
from .optim import build_optimizer, build_optimizer_and_scheduler, build_scheduler, freeze_backbone, parameter_groups
from .shapes import SHAPES_ID2LABEL, SHAPES_STUFF_IDS, render_shapes_example, shapes_dataset
from .train import DataArguments, ModelArguments, run
from .trainer import RECIPES, EomtTrainer, EomtTrainingArguments, Recipe

__all__ = [
    "HEADLINE",
    "RECIPES",
    "SHAPES_ID2LABEL",
    "SHAPES_STUFF_IDS",
    "AttnMaskAnnealingCallback",
    "DataArguments",
    "EomtTrainer",
    "EomtTrainingArguments",
    "EpochSeedCallback",
    "EvalCollator",
    "Example",
    "ModelArguments",
    "Recipe",
    "SegmentationCollator",
    "SegmentationDataset",
    "SegmentationMetrics",
    "TrainTransform",
    "UnreadableSampleError",
    "annealing_probs",
    "benchmark_key",
    "build_optimizer",
    "build_optimizer_and_scheduler",
    "build_scheduler",
    "default_annealing_steps",
    "freeze_backbone",
    "load_segmentation_dataset",
    "parameter_groups",
    "photometric_jitter",
    "render_shapes_example",
    "run",
    "shapes_dataset",
]
