"""`eomt export` / `export_model`: ONNX and torch.export files of tiny models of both backbones, run by onnxruntime and
`torch.export.load` against the PyTorch model; half precision; the atomic write; the missing-extra error."""

import os
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from modeling_eomt import (
    EomtConfig,
    EomtDinov3Config,
    EomtDinov3ForUniversalSegmentation,
    EomtForUniversalSegmentation,
    EomtImageProcessor,
)
from modeling_eomt import export as export_module
from modeling_eomt.cli import main as cli_main
from modeling_eomt.export import ExportError, MissingExtraError, export_model, float32_scores_attention

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_blocks": 1, "image_size": 64,
        "num_queries": 6, "num_labels": 5, "num_register_tokens": 2}  # fmt: skip
BACKBONES = {
    "dinov2": (EomtForUniversalSegmentation, EomtConfig, {}),
    "dinov3": (EomtDinov3ForUniversalSegmentation, EomtDinov3Config, {"intermediate_size": 64}),
}
OUTPUTS = ("class_queries_logits", "masks_queries_logits")


def tiny_model(backbone: str, seed: int = 0) -> EomtForUniversalSegmentation:
    model_class, config_class, extra = BACKBONES[backbone]
    torch.manual_seed(seed)
    model = model_class(config_class(**TINY, **extra)).eval()
    model.set_attn_mask_probs([0.0] * TINY["num_blocks"])
    return model


def relative_error(got: np.ndarray | torch.Tensor, expected: torch.Tensor) -> float:
    return ((torch.as_tensor(got) - expected).abs().max() / expected.abs().max()).item()


def run_onnx(path, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"pixel_values": pixel_values.numpy()})))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Saved tiny checkpoints (model + panoptic processor) of both backbones, with their models."""
    root = tmp_path_factory.mktemp("checkpoints")
    saved = {}
    for backbone in BACKBONES:
        model = tiny_model(backbone)
        model.save_pretrained(root / backbone)
        EomtImageProcessor.for_task("panoptic", TINY["image_size"]).save_pretrained(root / backbone)
        saved[backbone] = (root / backbone, model)
    return saved


@pytest.fixture(scope="module")
def onnx_export(checkpoints, tmp_path_factory):
    """DINOv2 through `eomt export`, into a folder holding an older export (DINOv3: the float16 test)."""
    folder = tmp_path_factory.mktemp("exports") / "dinov2"
    folder.mkdir()
    (folder / "model.onnx").write_text("an older export")
    (folder / "notes.txt").write_text("kept")
    assert cli_main(["export", str(checkpoints["dinov2"][0]), str(folder)]) == 0
    return folder


def test_onnx_export_matches_pytorch_at_several_shapes(checkpoints, onnx_export):
    folder, model = onnx_export, checkpoints["dinov2"][1]
    assert {"model.onnx", "config.json", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    graph = onnx.load(folder / "model.onnx").graph
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == list(OUTPUTS)
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(dims[i].dim_param for i in (0, 2, 3))  # dynamic batch, height, width
    assert onnx.load(folder / "model.onnx").opset_import[0].version == 18
    config = type(model.config).from_pretrained(folder)
    assert config.to_dict() == model.config.to_dict()
    assert (
        EomtImageProcessor.from_pretrained(folder).to_dict() == EomtImageProcessor.for_task("panoptic", 64).to_dict()
    )
    for shape in [(1, 3, 64, 64), (3, 3, 48, 80), (2, 3, 96, 32)]:
        pixel_values = torch.randn(shape)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values)
        got = run_onnx(folder / "model.onnx", pixel_values)
        for name in OUTPUTS:
            assert got[name].shape == getattr(expected, name).shape
            assert relative_error(got[name], getattr(expected, name)) <= 1e-4, (shape, name)


def test_cli_replaces_the_export_files_and_keeps_others(onnx_export):
    assert (onnx_export / "notes.txt").read_text() == "kept"
    assert (onnx_export / "model.onnx").read_bytes() != b"an older export"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_post_processing_of_runtime_outputs_gives_the_pytorch_segments(task, checkpoints, onnx_export):
    model, folder = checkpoints["dinov2"][1], onnx_export
    processor = EomtImageProcessor.for_task(task, 64)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 90), (70, 40)]]
    inputs = processor(images)
    sizes = [(image.height, image.width) for image in images]
    with torch.no_grad():
        expected = model(pixel_values=inputs["pixel_values"], patch_offsets=inputs.get("patch_offsets"))
    # the runtime's outputs as they come, plus the windows' offsets from the processor
    outputs = {
        name: torch.from_numpy(a) for name, a in run_onnx(folder / "model.onnx", inputs["pixel_values"]).items()
    }
    outputs["patch_offsets"] = inputs.get("patch_offsets")
    if task == "semantic":
        for got, want in zip(processor.post_process_semantic_segmentation(outputs, sizes),
                             processor.post_process_semantic_segmentation(expected, sizes)):  # fmt: skip
            assert torch.equal(got, want)
        return
    post_process = getattr(processor, f"post_process_{task}_segmentation")
    options = {"threshold": 0.0}  # random weights: low class scores; keep every segment
    got, want = post_process(outputs, sizes, **options), post_process(expected, sizes, **options)
    assert sum(len(r["segments_info"]) for r in want) > 0
    for g, w in zip(got, want):
        assert torch.equal(g["segmentation"], w["segmentation"])
        assert [s["label_id"] for s in g["segments_info"]] == [s["label_id"] for s in w["segments_info"]]
        np.testing.assert_allclose([s["score"] for s in g["segments_info"]], [s["score"] for s in w["segments_info"]],
                                   rtol=1e-4)  # fmt: skip


def test_float16_export_of_a_saved_dinov3_checkpoint(checkpoints, tmp_path):
    folder, model = checkpoints["dinov3"]
    result = export_model(folder, tmp_path / "fp16", dtype="float16")
    assert result.file == tmp_path / "fp16" / "model.onnx"
    assert set(result.relative_errors) == {(1, 3, 64, 64), (2, 3, 32, 64)}
    assert max(result.relative_errors.values()) <= 2e-2
    assert [p.name for p in tmp_path.iterdir()] == ["fp16"]  # renamed from the staging folder, with the usual mode
    assert oct(result.output_dir.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    graph = onnx.load(result.file).graph
    weights = [w for w in graph.initializer if w.dims and np.prod(w.dims) >= 32 * 32]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    for shape in [(3, 3, 80, 48), (1, 3, 32, 32)]:
        pixel_values = torch.randn(shape)
        got = run_onnx(result.file, pixel_values)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values)
        for name in OUTPUTS:
            assert got[name].dtype == np.float32 and np.isfinite(got[name]).all()
            assert relative_error(got[name], getattr(expected, name)) <= 2e-2


def test_float32_scores_attention_avoids_float16_overflow():
    """Large queries and keys overflow float16 scores (inf - inf = NaN in the softmax); the export's attention keeps
    them in float32 and matches the float32 model."""
    model = tiny_model("dinov2", seed=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_proj.weight.mul_(1000)
            layer.attention.k_proj.weight.mul_(1000)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).masks_queries_logits
        half = model.half()
        half.set_attn_implementation("eager")
        assert not half(pixel_values=pixel_values).masks_queries_logits.isfinite().all()
        from transformers import AttentionInterface

        AttentionInterface.register(export_module.FLOAT32_SCORES, float32_scores_attention)
        half.set_attn_implementation(export_module.FLOAT32_SCORES)
        got = half(pixel_values=pixel_values).masks_queries_logits.float()
    assert got.isfinite().all() and relative_error(got, expected) <= 2e-2


def test_pt2_program_loads_with_torch_export_load(checkpoints, tmp_path):
    model = checkpoints["dinov3"][1]
    # checked here rather than twice (loading a program takes seconds)
    args = ["export", str(checkpoints["dinov3"][0]), str(tmp_path / "pt2"), "--format", "pt2", "--no-verify"]
    assert cli_main(args) == 0
    program = torch.export.load(tmp_path / "pt2" / "model.pt2").module()
    for shape in [(1, 3, 64, 64), (3, 3, 32, 96)]:
        pixel_values = torch.randn(shape)
        with torch.no_grad():
            expected, got = model(pixel_values=pixel_values), program(pixel_values)
        for name, value in zip(OUTPUTS, got):
            assert relative_error(value, getattr(expected, name)) <= 1e-4


def test_static_shape_onnx_export(checkpoints, tmp_path, capsys):
    folder, model = checkpoints["dinov2"]
    assert cli_main(["export", str(folder), str(tmp_path / "static"), "--static-shape", "48", "80"]) == 0
    assert "verified at 1×3×48×80, 2×3×48×80" in capsys.readouterr().out
    dims = onnx.load(tmp_path / "static" / "model.onnx").graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 48, 80]
    pixel_values = torch.randn(3, 3, 48, 80)  # the batch stays dynamic
    got = run_onnx(tmp_path / "static" / "model.onnx", pixel_values)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values)
    assert all(relative_error(got[name], getattr(expected, name)) <= 1e-4 for name in OUTPUTS)
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument):
        run_onnx(tmp_path / "static" / "model.onnx", torch.randn(1, 3, 64, 64))


def test_bfloat16_static_shape_program(tmp_path):
    model = tiny_model("dinov2", seed=3)
    result = export_model(model, tmp_path / "bf16", format="pt2", dtype="bfloat16", static_shape=(48, 80))
    assert set(result.relative_errors) == {(1, 3, 48, 80), (2, 3, 48, 80)}
    assert max(result.relative_errors.values()) <= 2e-2
    program = torch.export.load(result.file).module()
    pixel_values = torch.randn(3, 3, 48, 80)  # the batch stays dynamic
    classes, masks = program(pixel_values)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values)
    assert classes.dtype == masks.dtype == torch.float32
    assert relative_error(masks, expected.masks_queries_logits) <= 2e-2
    with pytest.raises(Exception, match="(?i)shape|size|expected"):  # height and width are fixed
        program(torch.randn(1, 3, 64, 64))


def test_a_failed_check_leaves_the_output_folder_as_it_was(tmp_path, monkeypatch):
    model = tiny_model("dinov2")

    # a stand-in graph (no tracing) whose runtime is off by one: the real check must refuse it
    def off_by_one(file):
        def run(pixel_values):
            with torch.no_grad():
                outputs = model(pixel_values=pixel_values)
            return {name: getattr(outputs, name) + 1 for name in OUTPUTS}

        return run

    def stand_in(module, example, dynamic_shapes, file, opset):
        file.write_bytes(b"new graph")

    monkeypatch.setattr(export_module, "_write_graph", stand_in)
    monkeypatch.setattr(export_module, "load_runtime", off_by_one)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.pt2").write_text("previous")
    for output in ("out", "new"):
        with pytest.raises(ExportError, match="differs from PyTorch.*not written"):
            export_model(model, tmp_path / output, format="pt2")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left, no new folder
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.pt2"]
    assert (tmp_path / "out" / "model.pt2").read_text() == "previous"


def test_a_failed_export_creates_nothing(tmp_path, monkeypatch):
    def half_written(module, example, dynamic_shapes, file, opset):
        file.write_bytes(b"partial")
        raise ExportError("the onnx export failed: disk full")

    monkeypatch.setattr(export_module, "_write_graph", half_written)
    with pytest.raises(ExportError, match="disk full"):
        export_model(tiny_model("dinov3"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_extra_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"onnxruntime.*pip install 'modeling-eomt\[onnx\]'"):
        export_model(tiny_model("dinov2"), tmp_path / "out")
    assert isinstance(MissingExtraError("x"), ImportError)
    assert cli_main(["export", "some/model", str(tmp_path / "out")]) == 2
    assert "modeling-eomt[onnx]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_fail_with_the_problem_named(checkpoints, tmp_path, capsys):
    training = tiny_model("dinov2")
    training.set_attn_mask_probs([0.5])
    with pytest.raises(ExportError, match="training mechanism.*set_attn_mask_probs"):
        export_model(training, tmp_path / "out")
    cases = [
        ({"dtype": "float64"}, "Unknown dtype"),
        ({"opset": 17}, "opset 17 is too old"),
        ({"dtype": "bfloat16", "opset": 18}, "bfloat16 from opset 22"),
        ({"format": "tflite"}, "Unknown format"),
        ({"static_shape": (50, 64)}, "multiples of the patch size 16"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExportError, match=message):
            export_model(checkpoints["dinov2"][1], tmp_path / "out", **kwargs)
    assert cli_main(["export", "no/such-model", str(tmp_path / "out")]) == 2  # offline: not on the Hub
    assert "cannot load model no/such-model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
