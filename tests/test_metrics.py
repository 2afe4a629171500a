"""The evaluate modules: hand-computed PQ and mIoU cases, mask AP against pycocotools, offline loading by path."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from modeling_eomt.metrics import METRICS, load_metric, metric_path
from modeling_eomt.metrics.encoding import decode_runs, encode_runs


def load(name):
    return load_metric(name, keep_in_memory=True)


def test_run_length_roundtrip():
    rng = np.random.default_rng(0)
    for array in (rng.integers(-1, 3, (7, 5)), rng.random((3, 4, 6)) > 0.5, np.zeros((0, 4, 4), bool)):
        encoded = encode_runs(array)
        np.testing.assert_array_equal(decode_runs(encoded).astype(array.dtype), array)
    assert encode_runs(np.array([[4, 4, 4], [4, 7, 7]])) == {"shape": [2, 3], "values": [4, 7], "lengths": [4, 2]}


# ---------------------------------------------------------------------------------------------------------- mIoU


def test_mean_iou_hand_computed_with_ignore():
    predictions = [np.array([[0, 0, 1], [1, 2, 2]]), torch.tensor([[2, 2], [0, 0]])]
    references = [np.array([[0, 1, 1], [1, 2, 255]]), [[2, 2], [2, 255]]]
    result = load("mean_iou").compute(predictions=predictions, references=references, num_labels=3)
    # class 0: ∩1 pred3 ref1 → 1/3; class 1: ∩2 pred2 ref3 → 2/3; class 2: ∩3 pred3 ref4 → 3/4 (ignored pixels out)
    assert result["per_category_iou"] == pytest.approx([1 / 3, 2 / 3, 3 / 4])
    assert result["per_category_accuracy"] == pytest.approx([1, 2 / 3, 3 / 4])
    assert result["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert result["mean_accuracy"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert result["overall_accuracy"] == pytest.approx(6 / 8)


def test_mean_iou_absent_class_is_nan_and_left_out():
    metric = load("mean_iou")
    metric.add_batch(predictions=[np.array([[0, 1]])], references=[np.array([[0, 1]])])
    metric.add(prediction=np.array([[3, 1]]), reference=np.array([[0, 255]]))  # class 3 predicted, never labeled
    result = metric.compute(num_labels=5)
    iou = result["per_category_iou"]
    assert iou[:2] == [0.5, 1.0] and iou[3] == 0.0 and np.isnan(iou[2]) and np.isnan(iou[4])
    assert result["mean_iou"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3
    assert np.isnan(result["per_category_accuracy"][3])
    assert result["mean_accuracy"] == pytest.approx(0.75)


def test_mean_iou_errors():
    with pytest.raises(ValueError, match="num_labels"):
        load("mean_iou").compute(predictions=[[[0]]], references=[[[0]]])
    with pytest.raises(ValueError, match="outside 0..1"):
        load("mean_iou").compute(predictions=[[[0, 1]]], references=[[[0, 7]]], num_labels=2)
    with pytest.raises(ValueError, match="size"):
        load("mean_iou").compute(predictions=[np.zeros((2, 3), int)], references=[np.zeros((3, 2), int)], num_labels=2)
    with pytest.raises(ValueError, match="2-D"):
        load("mean_iou").compute(predictions=[np.zeros((1, 2, 3), int)], references=[np.zeros((2, 3), int)])


# ------------------------------------------------------------------------------------------------ panoptic quality

# Image 1: two things of class 0, a stuff region of class 5, void pixels (id 0 is not listed) in the bottom right.
GT_1 = {
    "segmentation": np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 0, 0]]),
    "segments_info": [{"id": 1, "label_id": 0}, {"id": 2, "label_id": 0}, {"id": 3, "label_id": 5}],
}
PRED_1 = {
    "segmentation": torch.tensor([[10, 10, 11, 11], [10, 12, 11, 11], [13, 13, 13, 13], [13, 13, 13, 14]]),
    "segments_info": [
        {"id": 10, "label_id": 0, "score": 0.9},  # IoU 3/4 with gt 1 → TP
        {"id": 11, "label_id": 0, "score": 0.9},  # IoU 1 with gt 2 → TP
        {"id": 12, "label_id": 1, "score": 0.9},  # class 1 nowhere in the gt → FP
        {"id": 13, "label_id": 5, "score": 0.9},  # 7 px, 1 on void: IoU 6/(7+6-6-1) = 1 → TP
        {"id": 14, "label_id": 0, "score": 0.9},  # entirely on void → ignored
    ],
}
# Image 2: a crowd region of class 0 on top, stuff of class 5 below.
GT_2 = {
    "segmentation": np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]),
    "segments_info": [{"id": 1, "label_id": 0, "iscrowd": 1}, {"id": 2, "label_id": 5}],
}
PRED_2 = {
    "segmentation": np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 3, 3]]),
    "segments_info": [
        {"id": 0, "label_id": 0},  # on the crowd region of its class → ignored
        {"id": 1, "label_id": 1},  # on a crowd region of another class → FP
        {"id": 2, "label_id": 5},  # IoU 6/8 → TP
        {"id": 3, "label_id": 5},  # unmatched → FP
    ],
}


def test_panoptic_quality_hand_computed_things_stuff():
    result = load("panoptic_quality").compute(
        predictions=[PRED_1, PRED_2], references=[GT_1, GT_2], stuff_classes=[5], per_category=True
    )
    # class 0: TP 2 (IoUs 0.75, 1) → PQ = SQ = 0.875, RQ 1. class 1: FP 2 → 0.
    # class 5: TP 2 (IoUs 1, 0.75), FP 1 → SQ 0.875, RQ 2/2.5 = 0.8, PQ 0.7.
    per_class = result["per_category"]
    assert per_class[0] == pytest.approx({"pq": 0.875, "sq": 0.875, "rq": 1.0, "tp": 2, "fp": 0, "fn": 0})
    assert per_class[1] == pytest.approx({"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 2, "fn": 0})
    assert per_class[5] == pytest.approx({"pq": 0.7, "sq": 0.875, "rq": 0.8, "tp": 2, "fp": 1, "fn": 0})
    assert result["pq"] == pytest.approx((0.875 + 0 + 0.7) / 3)
    assert result["sq"] == pytest.approx((0.875 + 0 + 0.875) / 3)
    assert result["rq"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert (result["n"], result["n_things"], result["n_stuff"]) == (3, 2, 1)
    assert result["pq_things"] == pytest.approx(0.4375) and result["rq_things"] == pytest.approx(0.5)
    assert result["pq_stuff"] == pytest.approx(0.7) and result["sq_stuff"] == pytest.approx(0.875)


def test_panoptic_quality_masks_form_matches_segments_form():
    def as_masks(example, crowd_key):
        ids = [info["id"] for info in example["segments_info"]]
        segmentation = np.asarray(example["segmentation"])
        return {
            "masks": np.stack([segmentation == i for i in ids]),
            "labels": [info["label_id"] for info in example["segments_info"]],
            crowd_key: [info.get("iscrowd", 0) for info in example["segments_info"]],
        }

    expected = load("panoptic_quality").compute(predictions=[PRED_1, PRED_2], references=[GT_1, GT_2])
    result = load("panoptic_quality").compute(
        predictions=[PRED_1, as_masks(PRED_2, "iscrowd")],
        references=[as_masks(GT_1, "iscrowd"), as_masks(GT_2, "is_crowd")],
    )
    assert result == pytest.approx(expected)


def test_panoptic_quality_perfect_and_void_handling():
    target = {
        "segmentation": np.array([[0, 0, -1], [1, 1, -1]]),
        "segments_info": [{"id": 0, "label_id": 2}, {"id": 1, "label_id": 3}],
    }
    # Same segments under other ids, spilling onto void pixels: still IoU 1.
    prediction = {
        "segmentation": np.array([[5, 5, 5], [9, 9, 9]]),
        "segments_info": [{"id": 5, "label_id": 2}, {"id": 9, "label_id": 3}],
    }
    result = load("panoptic_quality").compute(predictions=[prediction], references=[target])
    assert result == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    # A segment with IoU exactly 0.5 does not match (strictly greater is required).
    half = {"segmentation": np.array([[5, 5, -1], [5, 5, -1]]), "segments_info": [{"id": 5, "label_id": 2}]}
    result = load("panoptic_quality").compute(predictions=[half], references=[target], per_category=True)
    assert result["per_category"][2]["fp"] == 1 and result["per_category"][2]["fn"] == 1


def test_panoptic_quality_errors():
    target = {"segmentation": np.zeros((2, 2), int), "segments_info": [{"id": 0, "label_id": 1}]}
    with pytest.raises(ValueError, match="twice"):
        bad = {
            "segmentation": np.zeros((2, 2), int),
            "segments_info": [{"id": 0, "label_id": 1}, {"id": 0, "label_id": 2}],
        }
        load("panoptic_quality").compute(predictions=[bad], references=[target])
    with pytest.raises(ValueError, match="size"):
        small = {"segmentation": np.zeros((1, 2), int), "segments_info": [{"id": 0, "label_id": 1}]}
        load("panoptic_quality").compute(predictions=[small], references=[target])
    with pytest.raises(ValueError, match="num_labels=1"):
        load("panoptic_quality").compute(predictions=[target], references=[target], num_labels=1)
    with pytest.raises(ValueError, match="'masks' \\+ 'labels'"):
        load("panoptic_quality").compute(predictions=[{"segmentation": [[0]]}], references=[target])


# --------------------------------------------------------------------------------------------------------- mask AP

SIZE = 128  # large enough for all three COCO area ranges (32², 96²)


def random_mask(rng, size_range):
    mask = np.zeros((SIZE, SIZE), bool)
    h, w = rng.integers(*size_range, size=2)
    y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
    if rng.random() < 0.5:
        mask[y : y + h, x : x + w] = True
    else:
        yy, xx = np.ogrid[:SIZE, :SIZE]
        mask[((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1] = True
    return mask


def random_case(seed, num_images=6, num_classes=3):
    """Images with ground truth (some crowd) and detections: jittered copies, duplicates, wrong classes, noise."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for image in range(num_images):
        num_gt = int(rng.integers(0, 7)) if image else 5
        gt_masks = [random_mask(rng, (4, 110)) for _ in range(num_gt)]
        gt_labels = rng.integers(0, num_classes, num_gt)
        crowd = rng.random(num_gt) < 0.15
        dt_masks, dt_labels = [], []
        for mask, label in zip(gt_masks, gt_labels):
            for _ in range(int(rng.integers(0, 3))):
                shift = rng.integers(-6, 7, size=2)
                dt_masks.append(np.roll(mask, tuple(shift), axis=(0, 1)))
                dt_labels.append(label if rng.random() < 0.8 else rng.integers(0, num_classes))
        for _ in range(int(rng.integers(0, 4))):
            dt_masks.append(random_mask(rng, (4, 60)))
            dt_labels.append(rng.integers(0, num_classes))
        if image == 1:  # more than 100 detections of one class in one image
            dt_masks += [random_mask(rng, (3, 20)) for _ in range(110)]
            dt_labels += [0] * 110
        empty = np.zeros((0, SIZE, SIZE), bool)
        predictions.append(
            {
                "masks": np.stack(dt_masks) if dt_masks else empty,
                "labels": np.array(dt_labels, dtype=np.int64),
                "scores": rng.random(len(dt_masks)),
            }
        )
        references.append({"masks": np.stack(gt_masks) if gt_masks else empty, "labels": gt_labels, "iscrowd": crowd})
    return predictions, references


def pycocotools_stats(predictions, references, num_classes=3):
    coco = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    mask_utils = pytest.importorskip("pycocotools.mask")

    def rle(mask):
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        encoded["counts"] = encoded["counts"].decode()
        return encoded

    annotations, results = [], []
    for image_id, (prediction, reference) in enumerate(zip(predictions, references), start=1):
        for mask, label, crowd, area in zip(
            reference["masks"], reference["labels"], reference["iscrowd"], reference.get("areas", [None] * 1000)
        ):
            encoded = rle(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "segmentation": encoded,
                    "area": float(mask.sum() if area is None else area),
                    "iscrowd": int(crowd),
                    "bbox": mask_utils.toBbox(encoded).tolist(),
                }
            )
        for mask, label, score in zip(prediction["masks"], prediction["labels"], prediction["scores"]):
            results.append(
                {"image_id": image_id, "category_id": int(label) + 1, "segmentation": rle(mask), "score": float(score)}
            )
    ground_truth = coco.COCO()
    ground_truth.dataset = {
        "images": [{"id": i, "height": SIZE, "width": SIZE} for i in range(1, len(references) + 1)],
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        evaluation = cocoeval.COCOeval(ground_truth, ground_truth.loadRes(results), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


AP_KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
AR_KEYS = ["mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_ap_matches_pycocotools(seed):
    predictions, references = random_case(seed)
    expected = pycocotools_stats(predictions, references)
    result = load("mask_ap").compute(predictions=predictions, references=references)
    np.testing.assert_allclose([result[key] for key in AP_KEYS + AR_KEYS], expected, atol=1e-12)
    assert 0 < result["map"] < 1


def test_mask_ap_given_areas_and_segments_form_match_pycocotools():
    predictions, references = random_case(3, num_images=3)
    rng = np.random.default_rng(3)
    for reference in references:  # annotation areas that differ from pixel counts move masks across ranges
        reference["areas"] = reference["masks"].sum((1, 2)) * rng.uniform(0.3, 3.0, len(reference["masks"]))
    expected = pycocotools_stats(predictions, references)
    # predictions as post-processing returns them with binary maps
    processed = [
        {
            "segmentation": torch.from_numpy(p["masks"]),
            "segments_info": [
                {"id": i, "label_id": int(l), "score": float(s)}
                for i, (l, s) in enumerate(zip(p["labels"], p["scores"]))
            ],
        }
        for p in predictions
    ]
    result = load("mask_ap").compute(predictions=processed, references=references)
    np.testing.assert_allclose([result[key] for key in AP_KEYS + AR_KEYS], expected, atol=1e-12)


def test_mask_ap_hand_computed():
    gt = np.zeros((2, 20, 20), bool)
    gt[0, :10, :10] = True  # 100 px
    gt[1, 10:, 10:] = True
    good = gt[0].copy()
    half = np.zeros((20, 20), bool)
    half[:10, :5] = True  # IoU 0.5 with gt 0
    predictions = [{"masks": np.stack([half, good, gt[1]]), "scores": [0.9, 0.8, 0.7], "labels": [0, 0, 1]}]
    references = [{"masks": gt, "labels": [0, 1]}]
    result = load("mask_ap").compute(predictions=predictions, references=references, per_category=True)
    # Class 1: perfect → AP 1. Class 0 at IoU 0.5: the half mask (score 0.9) takes the gt, the good one is a FP:
    # precision 1 at recall 1 → AP 1. Above 0.5 the half mask is a FP and the good one a TP at rank 2: the envelope
    # gives precision 0.5 at every recall point → AP 0.5.
    ap_class0 = (1 + 9 * 0.5) / 10
    assert result["per_category"][0] == pytest.approx(ap_class0, abs=1e-12)
    assert result["per_category"][1] == pytest.approx(1.0, abs=1e-12)
    assert result["map"] == pytest.approx((ap_class0 + 1) / 2, abs=1e-12)
    assert result["map_50"] == pytest.approx(1.0, abs=1e-12)
    assert result["map_large"] == -1.0  # no ground truth above 96² px
    assert result["mar_1"] == pytest.approx((0.1 + 1) / 2)  # the top detection of class 0 matches only at 0.5


# --------------------------------------------------------------------------------------------------- offline load


def test_metrics_load_offline_in_fresh_hf_home(tmp_path):
    """`evaluate.load(<folder>)` copies the script into a modules cache: it must work in an empty HF_HOME, offline."""
    script = f"""
import json, evaluate, numpy as np
paths = {json.dumps({name: metric_path(name) for name in METRICS})}
masks = np.zeros((1, 4, 4), bool); masks[0, :2] = True
out = {{
    "mean_iou": evaluate.load(paths["mean_iou"]).compute(predictions=[[[0, 1]]], references=[[[0, 1]]], num_labels=2)["mean_iou"],
    "panoptic_quality": evaluate.load(paths["panoptic_quality"]).compute(
        predictions=[{{"masks": masks, "labels": [1]}}], references=[{{"masks": masks, "labels": [1]}}])["pq"],
    "mask_ap": evaluate.load(paths["mask_ap"]).compute(
        predictions=[{{"masks": masks, "labels": [1], "scores": [0.5]}}], references=[{{"masks": masks, "labels": [1]}}])["map_50"],
}}
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_METRICS_CACHE", None)
    completed = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    values = json.loads(completed.stdout.strip().splitlines()[-1])
    assert values == pytest.approx({"mean_iou": 1.0, "panoptic_quality": 1.0, "mask_ap": 1.0})
    assert any((tmp_path / "hf" / "modules").rglob("panoptic_quality.py"))  # the copy lives in the fresh cache


def test_load_metric_rejects_unknown_names():
    with pytest.raises(ValueError, match="panoptic_quality"):
        load_metric("pq")
