"""The train entry point end to end: save + reload in the pipeline, every task's metric, bit-exact resume, torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline, set_seed

from modeling_eomt import EomtForUniversalSegmentation
from modeling_eomt.training.shapes import render_shapes_example
from modeling_eomt.training.train import main

TINY = (
    '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_blocks": 1, "image_size": 64, '
    '"num_queries": 8, "train_num_points": 256}'
)


def train_args(output_dir: Path, task: str = "panoptic", steps: int = 4, extra: tuple = ()) -> list[str]:
    return [
        "--model_name_or_path",
        "coco_panoptic_eomt_small_640_2x",
        "--config_overrides",
        TINY,
        "--dataset_name",
        "shapes",
        "--task",
        task,
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "4",
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "2",
        "--report_to",
        "none",
        "--seed",
        "3",
        "--scale_min",
        "0.5",
        "--scale_max",
        "1.5",
        "--head_warmup_steps",
        "1",
        "--backbone_warmup_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--do_train",
        *extra,
    ]


@pytest.mark.parametrize(
    "task, metric", [("panoptic", "eval_pq"), ("instance", "eval_map"), ("semantic", "eval_miou")]
)
def test_train_saves_everything_and_loads_in_pipeline(tmp_path, task, metric):
    main(train_args(tmp_path, task, extra=("--do_eval", "--save_strategy", "no")))
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json"):
        assert (tmp_path / name).exists(), name
    assert not (tmp_path / ".staging").exists()  # staged, then renamed in
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert 0.0 <= results[metric] <= 1.0
    card = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "library_name: transformers" in card
    from huggingface_hub import ModelCard

    card_data = ModelCard(card).data
    assert card_data.datasets == ["shapes"]
    (result,) = card_data.eval_results
    assert result.metric_value == round(100 * results[metric], 2) and result.dataset_split == "validation"
    config = json.loads((tmp_path / "config.json").read_text())
    assert len(config["id2label"]) == {"panoptic": 6, "instance": 3, "semantic": 6}[task]

    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    assert isinstance(segmenter.model, EomtForUniversalSegmentation)
    image = render_shapes_example(0, seed=5, image_size=64)["image"].permute(1, 2, 0).numpy()
    from PIL import Image

    segments = segmenter(Image.fromarray(image), subtask=task, threshold=0.0)
    assert all(segment["label"] in config["id2label"].values() for segment in segments)


def test_resume_is_bit_identical(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(train_args(full, steps=4, extra=("--save_strategy", "no")))
    main(train_args(resumed, steps=4, extra=("--save_strategy", "steps", "--save_steps", "2")))
    # Train again from the step-2 checkpoint of the second run.
    checkpoint = resumed / "checkpoint-2"
    main(train_args(resumed, steps=4, extra=("--save_strategy", "no", "--resume_from_checkpoint", str(checkpoint))))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The annealing state comes from the global step, so it matches too.
    assert torch.equal(a["attn_mask_probs"], b["attn_mask_probs"])


def eval_args(args: list[str], eval_samples: int, eval_batch: int) -> list[str]:
    """`args` that also evaluate `eval_samples` images in batches of `eval_batch`."""
    args = list(args)
    args[args.index("--max_eval_samples") + 1] = str(eval_samples)
    args[args.index("--per_device_eval_batch_size") + 1] = str(eval_batch)
    return [*args, "--do_eval"]


def test_eval_metrics_do_not_depend_on_the_eval_batch_size(tmp_path):
    """5 images in batches of 2 leave a last batch of 1: its targets must reach the metric whole."""
    results = []
    for batch in (2, 5):
        output = tmp_path / str(batch)
        main(eval_args(train_args(output, "semantic", steps=2, extra=("--save_strategy", "no")), 5, batch))
        results.append(json.loads((output / "eval_results.json").read_text())["eval_miou"])
    assert results[0] == results[1] > 0


def test_two_process_torchrun_trains_one_model_and_evaluates_every_image_once(tmp_path):
    """Two CPU processes: gradients are averaged (one model), and evaluation of 5 images (4 per step across the
    processes, so one is padded) equals a single-process evaluation of the saved model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    trained = tmp_path / "trained"
    args = eval_args(train_args(trained, "semantic", steps=2, extra=("--save_strategy", "no", "--ddp_backend", "gloo")), 5, 2)  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "modeling_eomt.train", *args]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((trained / "train_results.json").read_text())["train_loss"] > 0
    distributed = json.loads((trained / "eval_results.json").read_text())["eval_miou"]

    single = eval_args(train_args(tmp_path / "single", "semantic"), 5, 2)
    single[single.index("--model_name_or_path") + 1] = str(trained)
    single.remove("--do_train")
    command = [sys.executable, "-m", "modeling_eomt.train", *single]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "single" / "eval_results.json").read_text())["eval_miou"] == distributed > 0


def test_segmentation_metrics_count_each_record_once():
    from types import SimpleNamespace

    from modeling_eomt import EomtImageProcessor
    from modeling_eomt.training.evaluation import SegmentationMetrics

    processor = EomtImageProcessor(size={"shortest_edge": 16, "longest_edge": 16})
    metrics = SegmentationMetrics(processor, "semantic", {0: "sky", 1: "grass"})
    assert metrics.compute() == {}  # nothing evaluated (an empty eval set)
    masks = torch.zeros(2, 16, 16)
    masks[0, :8], masks[1, 8:] = 1, 1  # sky above, grass below
    target = {"masks": masks, "class_labels": torch.tensor([0, 1]), "is_crowd": torch.zeros(2, dtype=torch.bool)}
    mask_logits = (masks * 20 - 10)[None]  # query 0 covers the sky, query 1 the grass
    class_logits = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]])
    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits, patch_offsets=None)
    metrics.add(metrics.encode(outputs, [target]))
    assert metrics.compute()["miou"] == 1.0
    metrics.add(metrics.encode(outputs, [target]))
    metrics.reset()  # an interrupted evaluation leaves nothing behind
    assert metrics.compute() == {}


def test_demo_trains_caches_and_writes_overlays(tmp_path, capsys):
    from modeling_eomt.training import demo

    args = ["--output", str(tmp_path), "--max-steps", "3", "--eval-images", "4", "--overlays", "2"]
    demo.main(args)
    first = capsys.readouterr().out
    assert "Training a small EoMT" in first and "PQ on 4 held-out shapes images" in first
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 2
    from PIL import Image

    assert Image.open(overlays[0]).size == (384, 384)
    demo.main(args)  # second run: straight to inference from the cache
    assert "Using the cached model" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Starting from checkpoints and backbones (bad inputs: test_bad_inputs.py; kills: test_fault_injection.py)
# ---------------------------------------------------------------------------------------------------------------


def fails_with(capsys, args: list[str], *expected: str) -> str:
    """Run `eomt-train` with `args`: exit code 2 and one line on stderr holding every `expected` text."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "Traceback" in line or "eomt-train: error: " in line]
    assert line.startswith("eomt-train: error: "), line  # on a line of its own, after any progress bar
    for text in expected:
        assert text in line, line
    return line


@pytest.fixture(scope="module")
def trained_panoptic(tmp_path_factory) -> Path:
    """A tiny model trained for one step on shapes panoptic (6 classes)."""
    output = tmp_path_factory.mktemp("trained")
    assert main(train_args(output, steps=1, extra=("--save_strategy", "no"))) == 0
    return output


def from_checkpoint(args: list[str], checkpoint: Path) -> list[str]:
    args = list(args)
    args[args.index("--model_name_or_path") + 1] = str(checkpoint)
    overrides = args.index("--config_overrides")
    del args[overrides : overrides + 2]
    return args


def test_adapt_class_head_starts_only_the_class_head_fresh(tmp_path, trained_panoptic):
    """Another label set (instance: the 3 thing classes) is refused without --adapt_class_head (test_bad_inputs.py);
    with it, the class head is the only weight that starts fresh."""
    base = from_checkpoint(train_args(tmp_path / "out", steps=1, extra=("--save_strategy", "no")), trained_panoptic)
    instance = [*base[: base.index("--task") + 1], "instance", *base[base.index("--task") + 2 :]]
    assert main([*instance, "--adapt_class_head"]) == 0
    trained, adapted = (
        load_file(trained_panoptic / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert adapted["class_predictor.weight"].shape[0] == 4 and trained["class_predictor.weight"].shape[0] == 7
    # (one training step at lr 1e-3 cannot move a weight back to its trained value; the backbone waits for warmup)
    assert torch.equal(adapted["embeddings.cls_token"], trained["embeddings.cls_token"])


def test_freeze_backbone_and_drop_path_rate(tmp_path):
    from modeling_eomt.training import ModelArguments, load_segmentation_dataset
    from modeling_eomt.training.train import load_model

    extra = ("--save_strategy", "no", "--freeze_backbone", "--drop_path_rate", "0.2")
    assert main(train_args(tmp_path, steps=3, extra=extra)) == 0
    assert json.loads((tmp_path / "config.json").read_text())["drop_path_rate"] == 0.2
    set_seed(3)  # the run's seed: the same initial weights
    initial = load_model(
        ModelArguments("coco_panoptic_eomt_small_640_2x", TINY), load_segmentation_dataset("shapes", num_examples=1)
    ).state_dict()
    trained = load_file(tmp_path / "model.safetensors")
    for name, value in trained.items():
        frozen = name.startswith(("embeddings.", "layers."))
        assert torch.equal(value, initial[name]) == frozen or name in ("attn_mask_probs", "criterion.empty_weight"), (
            name
        )


def test_training_from_a_pretrained_backbone(tmp_path, capsys):
    # A DINOv2-with-registers backbone in transformers' format (patch 14, resampled to the preset's 16): the trained
    # model's trunk starts from it, the recipe follows its family and the card names it.
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    backbone = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
            image_size=56, num_register_tokens=4,
        )
    )  # fmt: skip
    backbone.save_pretrained(tmp_path / "dinov2")
    args = train_args(
        tmp_path / "out", steps=2, extra=("--save_strategy", "no", "--backbone", str(tmp_path / "dinov2"))
    )
    overrides = args.index("--config_overrides") + 1
    args[overrides] = '{"num_blocks": 1, "train_num_points": 256, "image_size": 64, "num_queries": 8}'
    assert main(args) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"]) == (32, 2, 16)
    assert f"`{tmp_path / 'dinov2'}`" in (tmp_path / "out" / "README.md").read_text()
    # --backbone with an EoMT checkpoint, and a backbone that cannot be found: one line each, nothing trained.
    fails_with(capsys, [*args[:1], str(tmp_path / "out"), *args[2:]], "--backbone starts from a pretrained ViT")
    missing = [*args[: args.index("--backbone") + 1], str(tmp_path / "nowhere"), *args[args.index("--backbone") + 2 :]]
    fails_with(capsys, missing, "nowhere")
