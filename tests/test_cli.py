"""`eomt segment` end to end on a tiny saved model: overlays, JSON (RLE checked with pycocotools), errors."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from scipy import ndimage
from test_pipeline import ID2LABEL, save_tiny_checkpoint

from modeling_eomt import EomtImageProcessor
from modeling_eomt.cli import main
from modeling_eomt.rle import encode_rle


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_tiny_checkpoint(path, EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}))
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / "street.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8)).save(folder / "grey.png")
    return folder


def run(*args: str) -> int:
    return main(["segment", *args])


def test_segment_writes_overlay_and_json_per_image(model_path, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(str(images), "--model", str(model_path), "--output", str(out), "--threshold", "0.1") == 0
    assert "Segmented 2/2 image(s)" in capsys.readouterr().out
    for name, size in [("street", (60, 40)), ("grey", (30, 50))]:
        with Image.open(out / f"{name}.png") as overlay:
            assert overlay.size == size and overlay.mode == "RGB"
        result = json.loads((out / f"{name}.json").read_text())
        assert (result["width"], result["height"]) == size and result["task"] == "panoptic"
        assert result["segments"], "the tiny model is biased to predict segments"
        covered = np.zeros(size[::-1], dtype=np.int64)
        for segment in result["segments"]:
            assert segment["label"] == ID2LABEL[segment["label_id"]] and 0 < segment["score"] <= 1
            mask = coco_mask.decode({"size": segment["rle"]["size"], "counts": segment["rle"]["counts"].encode()})
            assert mask.shape == size[::-1] and int(mask.sum()) == segment["area"] > 0
            rows, cols = np.nonzero(mask)
            x, y, w, h = segment["bbox"]
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
            covered += mask
        assert covered.max() == 1  # panoptic segments do not overlap
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("task", ["instance", "semantic"])
def test_tasks_and_png_masks(model_path, images, tmp_path, task):
    out = tmp_path / "out"
    code = run(str(images / "street.jpg"), "--model", str(model_path), "--output", str(out), "--task", task,
               "--threshold", "0.05", "--mask-format", "png", "--batch-size", "2")  # fmt: skip
    assert code == 0
    result = json.loads((out / "street.json").read_text())
    assert result["task"] == task and result["segments"]
    with Image.open(out / result["mask_png"]) as id_png:
        ids = np.asarray(id_png)
    assert ids.shape == (40, 60)
    for segment in result["segments"]:
        assert int((ids == segment["png_value"]).sum()) == segment["area"]
    if task == "semantic":  # every pixel has a class
        assert sum(s["area"] for s in result["segments"]) == 40 * 60


def test_bad_images_are_reported_and_the_rest_processed(model_path, images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = run(str(images), str(tmp_path / "missing.jpg"), "--model", str(model_path), "--output", str(out))
    captured = capsys.readouterr()
    assert code == 1
    assert "cannot read image" in captured.err and "broken.png" in captured.err
    assert "no such file or folder" in captured.err and "missing.jpg" in captured.err
    assert (out / "street.json").is_file() and (out / "grey.json").is_file() and not (out / "broken.json").exists()
    assert "Segmented 2/3 image(s)" in captured.out


def test_bad_models_and_empty_folders_fail_with_one_line(model_path, images, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    cases = {
        "does not exist": [str(images), "--model", str(tmp_path / "nowhere")],
        "not a model folder": [str(images), "--model", str(images)],
        "not an EoMT checkpoint": [str(images), "--model", str(tmp_path / "vit")],
        "no images": [str(tmp_path / "empty"), "--model", str(model_path)],
    }
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    (tmp_path / "a_file").write_text("")
    cases = {
        **cases,
        "(its config.json)": [str(images), "--model", str(tmp_path / "odd")],
        "device 'nonsense' is not available": [str(images), "--model", str(model_path), "--device", "nonsense"],
        "--batch-size must be at least 1": [str(images), "--model", str(model_path), "--batch-size", "0"],
    }
    cases = {message: [*args, "--output", str(tmp_path / "out")] for message, args in cases.items()}
    cases["is a file; pass a folder"] = [str(images), "--model", str(model_path), "--output", str(tmp_path / "a_file")]  # fmt: skip
    for message, args in cases.items():
        assert run(*args) == 2
        error_lines = capsys.readouterr().err.strip().splitlines()
        assert len(error_lines) == 1 and error_lines[0].startswith("eomt: error") and message in error_lines[0]


def test_batches_of_mixed_sizes_give_what_single_images_give(model_path, images, tmp_path, capsys):
    Image.fromarray(np.full((70, 20, 3), 90, np.uint8)).save(images / "tall.png")
    unpadded = tmp_path / "unpadded"
    save_tiny_checkpoint(unpadded, EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}, do_pad=False))
    for checkpoint in (model_path, unpadded):
        results = {}
        for batch_size in ("1", "3"):
            out = tmp_path / f"{checkpoint.name}_{batch_size}"
            args = [str(images), "--model", str(checkpoint), "--output", str(out), "--threshold", "0.1"]
            assert run(*args, "--batch-size", batch_size, "--device", "cpu") == 0
            assert "Segmented 3/3 image(s)" in capsys.readouterr().out
            results[batch_size] = {p.name: json.loads(p.read_text())["segments"] for p in sorted(out.glob("*.json"))}
        assert results["1"] == results["3"] and len(results["1"]) == 3


def test_threshold_filters_segments(model_path, images, tmp_path):
    counts = {}
    for threshold in ("0.1", "0.6", "1.0"):
        out = tmp_path / threshold
        assert run(str(images / "street.jpg"), "--model", str(model_path), "--output", str(out),
                   "--threshold", threshold) == 0  # fmt: skip
        segments = json.loads((out / "street.json").read_text())["segments"]
        assert all(s["score"] >= float(threshold) for s in segments)
        counts[threshold] = len(segments)
    assert counts["0.1"] > counts["1.0"] == 0


def test_sliding_window_checkpoint_defaults_to_semantic(images, tmp_path, capsys):
    checkpoint = tmp_path / "semantic"
    processor = EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": None}, do_split_image=True, do_pad=False)
    save_tiny_checkpoint(checkpoint, processor)
    out = tmp_path / "out"
    assert run(str(images), "--model", str(checkpoint), "--output", str(out), "--threshold", "0.5") == 0
    captured = capsys.readouterr()
    assert "--threshold not used" in captured.err and "(semantic," in captured.out
    result = json.loads((out / "street.json").read_text())
    assert result["task"] == "semantic" and sum(s["area"] for s in result["segments"]) == 40 * 60


def test_failures_mid_run_keep_other_images_and_earlier_results(model_path, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run(str(images), "--model", str(model_path), "--output", str(out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    from modeling_eomt import cli, visualize

    def failing_predict(model, processor, batch, task, options):
        if batch[0].size == (30, 50):  # grey.png
            raise RuntimeError("out of memory")
        return predict(model, processor, batch, task, options)

    def failing_overlay(image, *args, **kwargs):
        raise KeyError("no colour")

    predict = cli.predict
    monkeypatch.setattr(cli, "predict", failing_predict)
    monkeypatch.setattr(visualize, "draw_overlay", failing_overlay)
    assert run(str(images), "--model", str(model_path), "--output", str(out), "--mask-format", "png") == 1
    captured = capsys.readouterr()
    assert "cannot segment" in captured.err and "grey.png: out of memory" in captured.err
    assert "cannot write results" in captured.err and "street.jpg" in captured.err
    assert "Segmented 0/2 image(s)" in captured.out
    # nothing written for either image: the earlier results are whole, no temporary files are left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "program", [[sys.executable, "-m", "modeling_eomt"], [str(Path(sys.executable).parent / "eomt")]]
)
def test_entry_points(model_path, images, tmp_path, program):
    out = tmp_path / "out"
    command = [*program, "segment", str(images / "grey.png"), "--model", str(model_path), "--output", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    assert (out / "grey.png").is_file() and json.loads((out / "grey.json").read_text())["height"] == 50


def test_rle_matches_pycocotools():
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 5), (40, 33)]:
        for density in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < density
            expected = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
            assert encode_rle(mask) == expected


def test_a_failure_between_files_leaves_the_earlier_result_whole(model_path, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [str(images / "street.jpg"), "--model", str(model_path), "--output", str(out), "--mask-format", "png"]
    assert run(*args, "--threshold", "0.1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 3  # mask PNG, overlay, JSON

    from modeling_eomt import cli

    calls = []

    def full_disk_at_the_second_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return mkstemp(*args, **kwargs)

    mkstemp = cli.tempfile.mkstemp
    monkeypatch.setattr(cli.tempfile, "mkstemp", full_disk_at_the_second_file)
    assert run(*args, "--threshold", "1.0") == 1  # no segments: other files, had they been written
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_progress_bar_on_a_terminal(model_path, images, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run(str(images), "--model", str(model_path), "--output", str(tmp_path / "out")) == 0
    assert "Segmenting" in terminal.getvalue() and "2/2" in terminal.getvalue()


def test_same_names_are_numbered_and_photos_upright(model_path, tmp_path):
    rng = np.random.default_rng(3)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)).save(tmp_path / folder / "photo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show rotated by 90°
    Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)).save(tmp_path / "a" / "turned.jpg", exif=exif)
    out = tmp_path / "out"
    assert run(str(tmp_path / "a"), str(tmp_path / "b"), "--model", str(model_path), "--output", str(out)) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["photo.json", "photo_2.json", "turned.json"]
    assert json.loads((out / "photo_2.json").read_text())["image"].endswith(str(Path("b") / "photo.png"))
    with Image.open(out / "turned.png") as overlay:
        assert overlay.size == (20, 50)


def test_dinov3_checkpoints_segment(images, tmp_path):
    import torch

    from modeling_eomt import EomtDinov3Config, EomtDinov3ForUniversalSegmentation

    config = EomtDinov3Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_blocks=1,
        image_size=32, patch_size=8, num_queries=6, num_register_tokens=1, id2label=ID2LABEL,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EomtDinov3ForUniversalSegmentation(config)
    model.set_attn_mask_probs([0.0])
    model.save_pretrained(tmp_path / "dinov3")
    EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(tmp_path / "dinov3")
    out = tmp_path / "out"
    assert run(str(images), "--model", str(tmp_path / "dinov3"), "--output", str(out), "--threshold", "0") == 0
    assert json.loads((out / "street.json").read_text())["task"] == "panoptic"


def test_overlay_and_segment_records_in_bands_equal_whole_image_work(monkeypatch):
    """Memory: the overlay is drawn a band of rows at a time, and every segment's area, bbox and RLE come from one
    pass over bands of columns; one-row and one-column bands give what whole-image bands give, and the RLE is
    pycocotools'."""
    from modeling_eomt import cli, visualize

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    ids = np.full((70, 90), -1, dtype=np.int64)
    ids[5:60, 10:50], ids[30:70, 40:90], ids[0, :] = 0, 1, 2  # overlapping boxes and a one-row segment on the border
    segments = [{"id": 0, "label_id": 0, "score": 0.9}, {"id": 1, "label_id": 2}, {"id": 2, "label_id": 1}]
    whole = np.asarray(visualize.draw_overlay(image, ids, segments))
    monkeypatch.setattr(visualize, "BAND_PIXELS", 1)
    assert np.array_equal(np.asarray(visualize.draw_overlay(image, ids, segments)), whole)

    monkeypatch.setattr(cli, "BAND_PIXELS", 70)  # one column per band
    summaries = cli._segment_summaries(ids, [0, 1, 2, 3], visualize.SegmentTally(ids, [0, 1, 2, 3]))
    for segment_id in (0, 1, 2, 3):
        mask = ids == segment_id
        area, bbox, counts = summaries[segment_id]
        assert area == int(mask.sum())
        assert counts == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        rows, cols = np.nonzero(mask)
        expected = (
            [int(cols.min()), int(rows.min()), int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1] if area else [0] * 4
        )
        assert bbox == expected


def test_segment_records_of_no_segments_and_of_negative_ids():
    from modeling_eomt import cli
    from modeling_eomt.visualize import SegmentTally

    ids = np.zeros((4, 5), dtype=np.int64)
    assert cli._segment_summaries(ids, [], SegmentTally(ids, [])) == {}
    absent = coco_mask.encode(np.zeros((4, 5), np.uint8, order="F"))["counts"].decode()  # an id not in the map
    assert cli._segment_summaries(ids, [3], SegmentTally(ids, [3])) == {3: (0, [0, 0, 0, 0], absent)}
    with pytest.raises(ValueError, match="Segment ids must be >= 0"):
        cli._segment_summaries(ids, [0, -1], SegmentTally(ids, [0, -1]))


@pytest.mark.parametrize("label_pixels", [1, 50, 2**20])
def test_labels_of_large_segments_are_placed_on_subsampled_boxes_inside_them(monkeypatch, label_pixels):
    """Memory: a segment's label goes at its most interior pixel, searched on every s-th row and column of its box
    when the box has more than `LABEL_PIXELS` pixels; the place is always inside the segment, thin ones included."""
    from modeling_eomt import visualize

    monkeypatch.setattr(visualize, "LABEL_PIXELS", label_pixels)
    ids = np.full((120, 100), -1, dtype=np.int64)
    ids[10:110, 5:95] = 0  # large
    ids[50, 3:97] = 1  # one row thin: missed by most subsampled grids
    ids[60:63, 70:73] = 2  # small
    tally = visualize.SegmentTally(ids, [0, 1, 2, 3])
    tally.add(ids)
    for segment_id in (0, 1, 2):
        x, y = visualize._interior_point(ids, segment_id, tally.box(segment_id))
        assert ids[y, x] == segment_id
    assert visualize._interior_point(ids, 3, tally.box(3)) is None
    if label_pixels == 2**20:  # the box is searched whole: a pixel farthest from the border
        distance = ndimage.distance_transform_edt(np.pad(ids == 0, 1))[1:-1, 1:-1]
        x, y = visualize._interior_point(ids, 0, tally.box(0))
        assert distance[y, x] == distance.max()
