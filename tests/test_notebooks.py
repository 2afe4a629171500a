"""The notebooks in `notebooks/` run top to bottom (nbclient, offline, small settings via EOMT_NOTEBOOK_FAST=1) and
produce what they promise: each writes a `results.json` next to its figures, which the tests check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_NAMES = ("01_inference", "02_fine_tuning", "03_conversion")
KERNEL_NAME = "eomt-test-python"
TIMEOUT = 600  # per cell; the fast settings need a small fraction of it


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory) -> Path:
    """A kernelspec that starts the kernel with this interpreter (the project's .venv), whatever else is installed."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "EoMT tests", "language": "python"}))
    return root


def execute(name: str, tmp_path: Path, jupyter_path: Path, monkeypatch) -> tuple[nbformat.NotebookNode, dict]:
    """Run notebook `name` with the current directory `tmp_path`; return it and its `results.json`."""
    # The kernel inherits this environment.
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("EOMT_NOTEBOOK_FAST", "1")
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # nothing may come from a cache of earlier downloads
    # One thread: on a machine shared with other jobs, two OpenMP threads per process thrash (10-20x slower).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=TIMEOUT, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    results = json.loads((tmp_path / "notebook_output" / name / "results.json").read_text())
    return notebook, results


def inline_images(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def check_figures(figures: dict, tmp_path: Path, names: set[str]) -> None:
    assert set(figures) >= names
    for path in figures.values():
        with Image.open(tmp_path / path) as image:
            assert image.format == "PNG" and min(image.size) >= 100
            assert len(set(image.convert("L").getdata())) > 10, f"{path} is blank"


def test_every_notebook_is_tested_and_committed_without_outputs():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NOTEBOOK_NAMES)
    for name in NOTEBOOK_NAMES:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code), name
        # The first code cell holds the parameters that EOMT_NOTEBOOK_FAST shrinks.
        assert "EOMT_NOTEBOOK_FAST" in code[0].source and "parameters" in code[0].metadata.get("tags", []), name


def test_inference_notebook(tmp_path, jupyter_path, monkeypatch):
    notebook, results = execute("01_inference", tmp_path, jupyter_path, monkeypatch)
    assert results["model_class"] == "modeling_eomt.modeling.EomtForUniversalSegmentation"
    # The processor path and pipeline("image-segmentation") give the same segments for every subtask.
    assert results["pipeline_matches_processor"] == {"panoptic": True, "instance": True, "semantic": True}
    assert all(count >= 1 for count in results["panoptic_segments"])
    # The briefly trained model already labels most pixels of unseen images right (a constant guess: < 0.45).
    assert results["semantic_pixel_accuracy"] > 0.7
    assert results["onnx_matches_pytorch"] is True
    check_figures(results["figures"], tmp_path, {"panoptic", "instance", "semantic", "pipeline", "onnx"})
    assert inline_images(notebook) >= 4


def test_fine_tuning_notebook(tmp_path, jupyter_path, monkeypatch):
    from transformers import Dinov2WithRegistersConfig

    from modeling_eomt import EomtForUniversalSegmentation
    from modeling_eomt.training.shapes import SHAPES_ID2LABEL

    notebook, results = execute("02_fine_tuning", tmp_path, jupyter_path, monkeypatch)
    metrics = results["eval_metrics"]
    assert results["eval_pq_before"] < 0.1
    assert metrics["eval_pq"] > 0.4 and metrics["eval_pq_stuff"] > 0.6
    losses = [loss for _, loss in results["losses"]]
    assert len(losses) >= 6 and sum(losses[-3:]) < 0.6 * sum(losses[:3])

    # The annealing callback drove the model's masked-attention probabilities through its windows, block by block.
    (starts, ends), history = results["annealing_windows"], results["mask_probs"]
    assert starts == sorted(starts) and all(0 < s < e <= history[-1][0] + 1 for s, e in zip(starts, ends))
    assert history[0] == [0, [1.0] * len(starts)]
    for step, probs in history:
        for prob, start, end in zip(probs, starts, ends):
            assert prob == 1.0 if step <= start else prob == 0.0 if step >= end else 0.0 < prob < 1.0
    assert results["final_mask_probs"] == [0.0] * len(starts)

    model = EomtForUniversalSegmentation.from_pretrained(tmp_path / results["model_dir"])
    assert model.config.id2label == SHAPES_ID2LABEL and model.attn_mask_probs.tolist() == [0.0] * len(starts)
    # The model started from the stand-in: a DINOv2-with-registers folder in the transformers format (read here by
    # transformers itself) at DINOv2's patch 14, whose trunk the model took over at the paper's patch 16.
    backbone = Dinov2WithRegistersConfig.from_pretrained(tmp_path / results["backbone_dir"])
    assert (backbone.model_type, backbone.patch_size, backbone.num_register_tokens) == ("dinov2_with_registers", 14, 4)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_register_tokens"):
        assert getattr(model.config, field) == getattr(backbone, field), field
    assert model.config.patch_size == 16
    # The `eomt-train --backbone` command builds the same start as `from_backbone`; the real runs name real backbones.
    assert results["command_matches_backbone"] is True
    assert {name: (c["backbone"], c["dataset_name"]) for name, c in results["commands"].items()} == {
        "shapes_from_standin": (results["backbone_dir"], "shapes"),
        "coco_panoptic": ("facebook/dinov2-with-registers-large", "/data/coco"),
        "ade20k_semantic": ("facebook/dinov3-vitl16-pretrain-lvd1689m", "zhoubolei/scene_parse_150"),
        "cityscapes_semantic": ("facebook/dinov2-with-registers-large", "/data/cityscapes"),
    }
    check_figures(results["figures"], tmp_path, {"ground_truth", "training_curves", "predictions"})
    assert inline_images(notebook) >= 3


def test_conversion_notebook(tmp_path, jupyter_path, monkeypatch):
    notebook, results = execute("03_conversion", tmp_path, jupyter_path, monkeypatch)
    # The converter's own check, and the notebook's: exact in float64, float32 rounding only in float32.
    assert results["converter_max_abs_difference"] <= 1e-4
    assert results["float64_max_abs_difference"] <= 1e-9
    assert results["float32_max_abs_difference"] <= 1e-5 * results["float32_logit_range"]
    assert (results["task"], results["dataset"], results["id2label_0"]) == ("panoptic", "coco_panoptic", "person")
    assert 20e6 < results["num_parameters"] < 25e6  # ViT-S with its head
    expected_files = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert results["cli_returncode"] == 0 and results["cli_files"] == expected_files
    assert "--overwrite" in results["overwrite_error"]
    assert results["model_class"] == "modeling_eomt.modeling.EomtForUniversalSegmentation"
    assert results["mask_logits_shape"] == [1, 200, 32, 32] and results["class_logits_shape"] == [1, 200, 134]
    assert results["pipeline_matches_processor"] and results["pipeline_classes"] >= 1
    check_figures(results["figures"], tmp_path, {"verification"})
    assert inline_images(notebook) >= 1
