"""`benchmarks/bench_backbone.py`: the pretrained trunk it writes as DINOv2, and its quick run end to end."""

import importlib.util
import struct
from pathlib import Path

import pytest
import torch
from transformers import Dinov2WithRegistersModel

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation
from modeling_eomt.backbones import HEAD_PREFIXES

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_backbone.py"
_SPEC = importlib.util.spec_from_file_location("bench_backbone", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "num_blocks": 1, "image_size": 32,
        "patch_size": 16, "num_queries": 5, "num_labels": 6, "layerscale_value": 0.5}  # fmt: skip


def trained_looking(model: EomtForUniversalSegmentation) -> EomtForUniversalSegmentation:
    """Every weight random, so that a dropped or misplaced tensor (zero biases, unit norms, ...) shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    return model.eval()


def test_the_trunk_as_dinov2_computes_what_it_computed_in_eomt():
    model = trained_looking(EomtForUniversalSegmentation(EomtConfig(**TINY)))
    dinov2 = bench.dinov2_from_trunk(model)
    assert isinstance(dinov2, Dinov2WithRegistersModel)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixels, output_hidden_states=True).hidden_states
        theirs = dinov2(pixels, output_hidden_states=True).hidden_states
    # The blocks before the queries join: the same tokens [CLS | registers | patches] in both (transformers' DINOv2
    # is the oracle of the conversion).
    before_queries = TINY["num_hidden_layers"] - TINY["num_blocks"]
    for index in range(before_queries + 1):
        torch.testing.assert_close(theirs[index], ours[index], rtol=1e-5, atol=1e-5)


def test_from_backbone_reads_back_the_whole_trunk(tmp_path):
    model = trained_looking(EomtForUniversalSegmentation(EomtConfig(**TINY)))
    folder = bench.save_backbone(bench.dinov2_from_trunk(model), tmp_path / "dinov2")
    assert not [p.name for p in tmp_path.iterdir() if p.name != "dinov2"]  # the staging folder is gone
    sizes = {k: TINY[k] for k in ("image_size", "num_queries", "num_blocks", "num_labels")}
    loaded = EomtForUniversalSegmentation.from_backbone(str(folder), **sizes).state_dict()
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    assert set(trunk) < set(loaded)
    for key, tensor in trunk.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0, msg=key)


def test_the_quick_comparison_trains_both_starts_and_plots_their_curves(tmp_path, capsys):
    result = bench.main(["--quick", "--output", str(tmp_path)])
    steps = list(range(bench.QUICK["eval_every"], bench.QUICK["steps"] + 1, bench.QUICK["eval_every"]))
    assert set(result["curves"]) == set(result["runs"]) == {"pretrained", "random"}
    for name, curve in result["curves"].items():
        runs = result["runs"][name]
        assert len(runs) == len(bench.SEEDS) and all(list(run) == steps for run in runs)
        for step, pq in curve.items():  # the mean of the seeds' runs
            assert 0 <= pq <= 1 and pq == pytest.approx(sum(run[step] for run in runs) / len(runs))
    assert list(result["clear_lead"]) == steps
    out = capsys.readouterr().out
    assert "pretrained start, mean" in out and "random start, seed 1" in out
    assert "every pretrained seed above every random seed, by step: 1: " in out
    data = (tmp_path / "backbone_pq.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] > 300


def test_eval_points_that_miss_the_last_step_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of eval_every"):
        bench.fine_tune(tmp_path, bench.QUICK_MODEL, steps=5, eval_every=2, eval_images=2, train_images=8)


def test_a_clear_lead_needs_every_pretrained_seed_above_every_random_seed():
    runs = {
        "pretrained": [{20: 0.5, 40: 0.7, 60: 0.9}, {20: 0.3, 40: 0.6, 60: 0.8}],
        "random": [{20: 0.4, 40: 0.5, 60: 0.8}, {20: 0.1, 40: 0.2, 60: 0.3}],
    }
    # Step 20: the means lead (0.40 vs 0.25) but the seeds overlap; step 60: a tie is no lead.
    assert bench.clear_lead(runs) == {20: False, 40: True, 60: False}
