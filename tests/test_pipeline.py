"""pipeline("image-segmentation", model=PATH) on folders saved by this package: our classes, every subtask."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor

ID2LABEL = {0: "cat", 1: "sky", 2: "road"}


def save_tiny_checkpoint(path, processor: EomtImageProcessor) -> None:
    config = EomtConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_blocks=1, image_size=32, patch_size=8,
        num_queries=6, num_register_tokens=1, id2label=ID2LABEL, train_num_points=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EomtForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.bias[:3] += 4  # confident enough that segments pass the thresholds
    model.save_pretrained(path)
    processor.save_pretrained(path)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def panoptic_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("panoptic")
    save_tiny_checkpoint(path, EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}))
    return path


@pytest.fixture(scope="module")
def semantic_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("semantic")
    processor = EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": None}, do_split_image=True, do_pad=False)
    save_tiny_checkpoint(path, processor)
    return path


def check_annotations(annotations, image, with_scores: bool) -> None:
    assert annotations, "expected at least one segment"
    for item in annotations:
        assert item["label"] in ID2LABEL.values()
        assert item["mask"].size == image.size and item["mask"].mode == "L"
        assert set(np.unique(np.asarray(item["mask"]))) <= {0, 255}
        assert (item["score"] is not None) == with_scores


@pytest.mark.parametrize("subtask", ["panoptic", "instance", "semantic", None])
def test_pipeline_loads_our_classes_and_runs_every_subtask(panoptic_path, image, subtask):
    segmenter = pipeline("image-segmentation", model=str(panoptic_path))
    assert type(segmenter.model) is EomtForUniversalSegmentation
    assert isinstance(segmenter.image_processor, EomtImageProcessor)  # ours, under the backend's class name
    annotations = segmenter(image, subtask=subtask, threshold=0.1)
    check_annotations(annotations, image, with_scores=subtask != "semantic")
    if subtask in ("panoptic", None):  # non-overlapping masks
        coverage = sum(np.asarray(a["mask"], dtype=np.int64) // 255 for a in annotations)
        assert coverage.max() <= 1


def test_pipeline_matches_processor_and_model_run_by_hand(panoptic_path, image):
    segmenter = pipeline("image-segmentation", model=str(panoptic_path))
    model = EomtForUniversalSegmentation.from_pretrained(panoptic_path).eval()
    processor = EomtImageProcessor.from_pretrained(panoptic_path)
    with torch.no_grad():
        outputs = model(**processor(image))
    expected = processor.post_process_panoptic_segmentation(
        outputs, [(40, 60)], threshold=0.3, overlap_mask_area_threshold=0.5
    )[0]
    annotations = segmenter(image, subtask="panoptic", threshold=0.3)
    assert [a["label"] for a in annotations] == [ID2LABEL[s["label_id"]] for s in expected["segments_info"]]
    for annotation, segment in zip(annotations, expected["segments_info"]):
        assert np.array_equal(np.asarray(annotation["mask"]) > 0, (expected["segmentation"] == segment["id"]).numpy())


@pytest.mark.parametrize("subtask", [None, "semantic", "panoptic", "instance"])
def test_sliding_window_checkpoint_works_without_subtask(semantic_path, image, subtask):
    segmenter = pipeline("image-segmentation", model=str(semantic_path))
    assert segmenter.image_processor.do_split_image
    annotations = segmenter(image, subtask=subtask)
    check_annotations(annotations, image, with_scores=subtask != "semantic")
    coverage = sum(np.asarray(a["mask"], dtype=np.int64) // 255 for a in annotations)
    assert coverage.min() == coverage.max() == 1  # a semantic map covers every pixel exactly once
