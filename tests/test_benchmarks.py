"""`benchmarks/run.py` (the `make bench` entry) at tiny sizes: it writes the Markdown table, the plot and raw numbers."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
HEADER = "| Benchmark | Setting | Ratio | Target | Met | Wall ratio | Ours | Baseline |"
BENCHMARKS = {
    "forward vs bare ViT": None,
    "arithmetic vs bare ViT (FLOPs)": None,
    "forward time per FLOP vs bare ViT": 1.03,
    "forward vs built-in": 1.0,
    "forward vs Mask2Former Swin-T": None,
    "DINOv3 forward vs built-in eomt_dinov3": 1.0,
    "DINOv3 forward vs bare DINOv3 ViT": None,
    "compiled forward vs compiled built-in": None,
    "onnxruntime forward vs eager": None,
    "panoptic post-processing": 0.2,
    "instance post-processing": 0.2,
    "semantic post-processing": 0.6,
    "semantic post-processing, noisy": 0.6,
    "end to end (image → segments)": 0.8,
    "training step time": 0.7,
    "training step peak memory": 0.7,
    "inference peak memory": 1.0,
    "eomt segment peak memory vs its segment map": 2.5,
    "pretrained start vs random start": 0.9,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("bench")
    subprocess.run(
        [sys.executable, str(RUN), "--quick", "--output", str(output)], check=True, capture_output=True, timeout=600
    )
    return output


def table_rows(markdown: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = lines.index(HEADER) + 2  # skip the alignment line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_table_has_every_benchmark_with_ratios_and_targets(quick_run):
    markdown = (quick_run / "benchmarks.md").read_text()
    # the header names when and where it was measured
    assert f"torch {torch.__version__}" in markdown and f"transformers {transformers.__version__}" in markdown
    assert "cores" in markdown and "Load average" in markdown
    rows = table_rows(markdown)
    assert {row[0] for row in rows} == set(BENCHMARKS)
    raw = json.loads((quick_run / "benchmarks.json").read_text())["rows"]
    assert len(raw) == len(rows)
    for row, numbers in zip(rows, raw):
        name, _, ratio, target, met, wall_ratio, ours, baseline = row
        assert name == numbers["benchmark"]
        assert numbers["ours"] > 0 and numbers["baseline"] > 0
        assert numbers["ratio"] == pytest.approx(numbers["ours"] / numbers["baseline"])
        assert float(ratio) == pytest.approx(numbers["ratio"], abs=0.005)
        expected_target = BENCHMARKS[name]
        if expected_target is None:
            assert (target, met) == ("—", "")
        else:
            assert float(target.removeprefix("≤ ")) == expected_target
            assert met == ("yes" if numbers["ratio"] <= expected_target else "**no**")
        units = (" ms", " MB", " GFLOP", " ms/TFLOP", " PQ pts")
        assert ours.endswith(units) and baseline.split(" (")[0].endswith(units)
        # time rows also compare wall-clock time; memory and arithmetic have none
        if ours.endswith((" ms", " ms/TFLOP")):
            assert numbers["wall_ratio"] > 0 and float(wall_ratio) == pytest.approx(numbers["wall_ratio"], abs=0.005)
        else:
            assert (wall_ratio, numbers["wall_ratio"]) == ("—", None)


def test_plot_is_a_png(quick_run):
    data = (quick_run / "benchmarks.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 500 and height > 300


def test_bad_repeats_is_a_clear_error():
    command = [sys.executable, str(RUN), "--repeats", "0"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--repeats must be at least 1" in result.stderr
