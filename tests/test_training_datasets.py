"""Training datasets: each source (COCO files, `datasets` tables, Cityscapes and semantic folders, shapes) on small
local data of its schema, and the loader that picks among them."""

import json
import pickle

import datasets
import numpy as np
import pytest
import torch
from modeling_eomt.configuration.labels import id2label as benchmark_labels
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from modeling_eomt.training.annotations import polygons_to_mask
from modeling_eomt.training.augmentation import TrainTransform
from modeling_eomt.training.dataset import SegmentationDataset
from modeling_eomt.training.hub import hf_dataset
from modeling_eomt.training.loading import load_segmentation_dataset
from modeling_eomt.training.shapes import SHAPES_ID2LABEL, SHAPES_STUFF_IDS, render_shapes_example

# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny images whose annotations we know
# ---------------------------------------------------------------------------------------------------------------


def _image(seed: int, height: int = 12, width: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(array: np.ndarray, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _panoptic_png(segment_ids: np.ndarray) -> np.ndarray:
    """RGB encoding of a segment id map (id = R + 256 G + 256² B)."""
    return np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536], -1).astype(np.uint8)


def _segment_map(seed: int, height: int = 12, width: int = 16) -> np.ndarray:
    """Segment ids 300 (left band), 70000 (right band), 5 (a block; crowd), 0 elsewhere (void)."""
    ids = np.zeros((height, width), np.int64)
    ids[:, : width // 2] = 300
    ids[:, width // 2 :] = 70000
    ids[2 + seed : 6 + seed, 3:7] = 5
    ids[-2:] = 0
    return ids


# Sparse COCO-style category ids, things before stuff.
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 7, "name": "train", "isthing": 1},
    {"id": 92, "name": "banner", "isthing": 0},
]
SEGMENTS = [
    {"id": 300, "category_id": 7, "iscrowd": 0},
    {"id": 70000, "category_id": 92, "iscrowd": 0},
    {"id": 5, "category_id": 1, "iscrowd": 1},
]
EXPECTED = {300: (1, False), 70000: (2, False), 5: (0, True)}  # segment id -> (contiguous label, crowd)


def _check_panoptic(example, seed: int, image: np.ndarray | None = None):
    ids = _segment_map(seed)
    if image is not None:
        assert torch.equal(example["image"], torch.from_numpy(image).permute(2, 0, 1))
    assert example["image"].dtype == torch.uint8 and example["masks"].dtype == torch.bool
    assert example["class_labels"].dtype == torch.int64
    for mask, label, crowd, (segment, (want_label, want_crowd)) in zip(
        example["masks"], example["class_labels"], example["is_crowd"], EXPECTED.items()
    ):
        assert torch.equal(mask, torch.from_numpy(ids == segment))
        assert (int(label), bool(crowd)) == (want_label, want_crowd)


@pytest.fixture
def coco_panoptic_root(tmp_path):
    """COCO panoptic in its original layout: annotations/panoptic_val2017{.json,/}, val2017/."""
    images, annotations = [], []
    for seed in range(2):
        _save(_image(seed), tmp_path / "val2017" / f"{seed:012d}.png")
        _save(_panoptic_png(_segment_map(seed)), tmp_path / "annotations" / "panoptic_val2017" / f"{seed:012d}.png")
        images.append({"id": seed, "file_name": f"{seed:012d}.png", "height": 12, "width": 16})
        annotations.append({"image_id": seed, "file_name": f"{seed:012d}.png", "segments_info": SEGMENTS})
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# COCO: polygons, panoptic and instance files
# ---------------------------------------------------------------------------------------------------------------


def test_polygon_rasteriser_agrees_with_pycocotools():
    # Axis-aligned rectangle, by hand: pixel centres x in [1, 5), y in [1, 4).
    expected = np.zeros((6, 7), bool)
    expected[1:4, 1:5] = True
    assert np.array_equal(polygons_to_mask([[1, 1, 5, 1, 5, 4, 1, 4]], 6, 7), expected)
    rng = np.random.default_rng(1)
    for _ in range(20):
        count = rng.integers(3, 12)
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = rng.uniform(4, 25, count)  # star-shaped, often non-convex
        polygon = np.stack([30 + radii * np.cos(angles), 28 + radii * np.sin(angles)], 1).ravel().tolist()
        ours = polygons_to_mask([polygon], 60, 64)
        oracle = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([polygon], 60, 64))).astype(bool)
        iou = (ours & oracle).sum() / (ours | oracle).sum()
        assert iou > 0.95, iou


def test_coco_panoptic_layout(coco_panoptic_root):
    dataset = load_segmentation_dataset(coco_panoptic_root, "panoptic", "val")
    assert dataset.id2label == {0: "person", 1: "train", 2: "banner"}
    assert dataset.stuff_ids == (2,)
    assert len(dataset) == 2
    # `datasets`' name for the split (the Trainer's default) finds COCO's "val"
    assert len(load_segmentation_dataset(coco_panoptic_root, "panoptic", "validation")) == 2
    for seed in range(2):
        _check_panoptic(dataset[seed], seed, _image(seed))


def test_coco_panoptic_serves_instance_and_semantic_training(coco_panoptic_root):
    instance = load_segmentation_dataset(coco_panoptic_root, "instance", "val")
    assert instance.id2label == {0: "person", 1: "train"} and instance.stuff_ids == ()
    example = instance[0]
    assert example["class_labels"].tolist() == [1, 0] and example["is_crowd"].tolist() == [False, True]
    semantic = load_segmentation_dataset(coco_panoptic_root, "semantic", "val")[0]
    ids = _segment_map(0)
    assert semantic["class_labels"].tolist() == [0, 1, 2] and "is_crowd" not in semantic
    for label, segment in ((0, 5), (1, 300), (2, 70000)):
        assert torch.equal(semantic["masks"][label], torch.from_numpy(ids == segment))


def test_coco_panoptic_errors(coco_panoptic_root):
    (coco_panoptic_root / "annotations" / "panoptic_val2017" / "000000000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="000000000001.png"):
        load_segmentation_dataset(coco_panoptic_root, "panoptic", "val")
    json_path = coco_panoptic_root / "annotations" / "panoptic_val2017.json"
    data = json.loads(json_path.read_text())
    data["annotations"] = data["annotations"][:1]
    data["annotations"][0]["segments_info"] = [{"id": 300, "category_id": 42}]
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category_id 42"):
        load_segmentation_dataset(json_path, "panoptic", "val")[0]
    with pytest.raises(ValueError, match="semantic annotations, which cannot train the panoptic"):
        SegmentationDataset([], None, source_task="semantic", task="panoptic", id2label={})


def _polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_coco_instance_json_polygons_and_rle(tmp_path):
    crowd = np.zeros((12, 16), np.uint8)
    crowd[5:9, 2:14] = 1
    compressed = coco_mask.encode(np.asfortranarray(crowd))
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 3, "iscrowd": 0,
         "segmentation": [_polygon(1, 1, 6, 5), _polygon(8, 2, 12, 4)]},
        {"id": 2, "image_id": 10, "category_id": 9, "iscrowd": 1,
         "segmentation": {"size": [12, 16], "counts": compressed["counts"].decode()}},
        {"id": 3, "image_id": 11, "category_id": 9, "iscrowd": 0,
         "segmentation": [[2.5, 1.2, 13.7, 4.4, 6.1, 10.9, 4.0, 5.5]]},
    ]  # fmt: skip
    data = {
        "images": [{"id": 10, "file_name": "a.jpg", "height": 12, "width": 16},
                   {"id": 11, "file_name": "b.jpg", "height": 12, "width": 16},
                   {"id": 12, "file_name": "c.jpg", "height": 12, "width": 16}],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}],
    }  # fmt: skip
    for i, name in enumerate("abc"):
        _save(_image(i), tmp_path / "images" / f"{name}.jpg")
    (tmp_path / "train.json").write_text(json.dumps(data))

    dataset = load_segmentation_dataset(tmp_path, "instance", "train")
    assert dataset.id2label == {0: "cat", 1: "dog"} and len(dataset) == 3
    oracle = COCO(str(tmp_path / "train.json"))
    first, second, third = dataset[0], dataset[1], dataset[2]
    assert first["class_labels"].tolist() == [0, 1] and first["is_crowd"].tolist() == [False, True]
    for mask, ann_id in zip(list(first["masks"]) + list(second["masks"]), (1, 2, 3)):
        reference = torch.from_numpy(oracle.annToMask(oracle.anns[ann_id]).astype(bool))
        assert (mask ^ reference).sum() <= 2, ann_id
    assert third["masks"].shape == (0, 12, 16)  # an image without annotations


def test_coco_instance_missing_image_is_named(tmp_path):
    data = {"images": [{"id": 1, "file_name": "missing.jpg", "height": 4, "width": 4}], "annotations": [],
            "categories": [{"id": 1, "name": "x"}]}  # fmt: skip
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match="missing.jpg.*image_dir"):
        load_segmentation_dataset(tmp_path / "annotations.json", "instance")


# ---------------------------------------------------------------------------------------------------------------
# `datasets` tables: save_to_disk, imagefolder with metadata
# ---------------------------------------------------------------------------------------------------------------


def test_panoptic_table_saved_to_disk(tmp_path):
    table = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(_image(s)) for s in range(2)],
            "label": [Image.fromarray(_panoptic_png(_segment_map(s))) for s in range(2)],
            "segments_info": [SEGMENTS, SEGMENTS],
        },
        features=datasets.Features({
            "image": datasets.Image(), "label": datasets.Image(),
            "segments_info": datasets.List({"id": datasets.Value("int64"), "category_id": datasets.Value("int64"),
                                            "iscrowd": datasets.Value("int64")}),
        }),
    )  # fmt: skip
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "saved"))
    dataset = load_segmentation_dataset(tmp_path / "saved", "panoptic", "validation", classes=CATEGORIES)
    assert dataset.stuff_ids == (2,)
    for seed in range(2):
        _check_panoptic(dataset[seed], seed, _image(seed))
    first = dataset.select([1])
    assert len(first) == 1 and len(dataset) == 2
    _check_panoptic(first[0], 1, _image(1))
    with pytest.raises(ValueError, match="not 'train'"):
        load_segmentation_dataset(tmp_path / "saved", "panoptic", "train", classes=CATEGORIES)
    with pytest.raises(ValueError, match="classes="):
        load_segmentation_dataset(tmp_path / "saved", "panoptic", "validation")


def test_panoptic_table_with_class_labels_keeps_the_benchmarks_stuff_classes():
    """A Hub panoptic table whose `category_id` is a ClassLabel (names only): things and stuff by the benchmark."""
    from modeling_eomt.configuration.labels import stuff_ids

    names = list(benchmark_labels("coco_panoptic").values())[::-1]  # another order than the benchmark's
    segment_map = _segment_map(0)
    info = [{"id": 300, "category_id": names.index("train"), "iscrowd": 0},
            {"id": 70000, "category_id": names.index("banner"), "iscrowd": 0},
            {"id": 5, "category_id": names.index("person"), "iscrowd": 1}]  # fmt: skip
    category = datasets.ClassLabel(names=names)
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(_image(0))], "label": [Image.fromarray(_panoptic_png(segment_map))],
         "segments_info": [info]},
        features=datasets.Features({
            "image": datasets.Image(), "label": datasets.Image(),
            "segments_info": datasets.List({"id": datasets.Value("int64"), "category_id": category,
                                            "iscrowd": datasets.Value("int64")}),
        }),
    )  # fmt: skip
    panoptic = hf_dataset(table, "panoptic", dataset_key="coco_panoptic")
    stuff_names = {benchmark_labels("coco_panoptic")[k] for k in stuff_ids("coco_panoptic")}
    assert {panoptic.id2label[k] for k in panoptic.stuff_ids} == stuff_names
    assert names.index("banner") in panoptic.stuff_ids and names.index("train") not in panoptic.stuff_ids
    instance = hf_dataset(table, "instance", dataset_key="coco_panoptic")
    assert "banner" not in instance.id2label.values() and len(instance.id2label) == 80


def test_panoptic_imagefolder_with_metadata(tmp_path):
    root = tmp_path / "coco_like"
    rows = []
    for seed in range(2):
        _save(_image(seed), root / "train" / "images" / f"{seed}.png")
        _save(_panoptic_png(_segment_map(seed)), root / "train" / "panoptic" / f"{seed}.png")
        rows.append({"file_name": f"images/{seed}.png", "panoptic_file_name": f"panoptic/{seed}.png",
                     "segments_info": SEGMENTS})  # fmt: skip
    (root / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "categories.json").write_text(json.dumps(CATEGORIES))
    dataset = load_segmentation_dataset(root, "panoptic", "train", classes=root / "categories.json",
                                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert dataset.id2label == {0: "person", 1: "train", 2: "banner"}
    for seed in range(2):
        _check_panoptic(dataset[seed], seed, _image(seed))


def test_instance_table_with_objects(tmp_path):
    table = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(_image(0))],
            "objects": [{"category": [1, 0], "segmentation": [[_polygon(1, 1, 6, 5)], [_polygon(8, 2, 12, 4)]]}],
        },
        features=datasets.Features({
            "image": datasets.Image(),
            "objects": {"category": datasets.List(datasets.ClassLabel(names=["cat", "dog"])),
                        "segmentation": datasets.List(datasets.List(datasets.List(datasets.Value("float32"))))},
        }),
    )  # fmt: skip
    table.save_to_disk(str(tmp_path / "objects"))
    dataset = load_segmentation_dataset(tmp_path / "objects", "instance")
    assert dataset.id2label == {0: "cat", 1: "dog"}
    example = dataset[0]
    assert example["class_labels"].tolist() == [1, 0]
    assert example["masks"][0].sum() == 5 * 4 and example["masks"][0, 1:5, 1:6].all()


def test_ade20k_schema_shifts_ids_and_ignores_zero(tmp_path):
    annotation = np.random.default_rng(0).integers(0, 151, (12, 16)).astype(np.uint8)
    annotation[0, :3] = [0, 1, 150]
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(_image(0))], "annotation": [Image.fromarray(annotation)], "scene_category": [3]},
        features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                    "scene_category": datasets.ClassLabel(num_classes=1055)}),
    )  # fmt: skip
    table.save_to_disk(str(tmp_path / "scene_parse_150"))  # the name tells the benchmark
    dataset = load_segmentation_dataset(tmp_path / "scene_parse_150", "semantic")
    assert dataset.id2label == benchmark_labels("ade20k_semantic") and len(dataset.id2label) == 150
    example = dataset[0]
    assert "is_crowd" not in example
    expected = sorted(set(np.unique(annotation).tolist()) - {0})
    assert example["class_labels"].tolist() == [v - 1 for v in expected]
    for mask, label in zip(example["masks"], example["class_labels"]):
        assert torch.equal(mask, torch.from_numpy(annotation == int(label) + 1))
    assert not example["masks"][:, annotation == 0].any()


def test_cityscapes_folders_and_table(tmp_path):
    train_ids = np.random.default_rng(0).integers(0, 19, (12, 16)).astype(np.uint8)
    train_ids[:2] = 255
    # Raw label ids whose train ids are train_ids (inverse of the official table), void -> 0 ("unlabeled").
    to_raw = {0: 7, 1: 8, 2: 11, 3: 12, 4: 13, 5: 17, 6: 19, 7: 20, 8: 21, 9: 22, 10: 23, 11: 24, 12: 25, 13: 26,
              14: 27, 15: 28, 16: 31, 17: 32, 18: 33, 255: 0}  # fmt: skip
    raw_ids = np.vectorize(to_raw.get)(train_ids).astype(np.uint8)
    for layout, suffix, mask in (("trainids", "labelTrainIds", train_ids), ("rawids", "labelIds", raw_ids)):
        root = tmp_path / layout
        _save(_image(0), root / "leftImg8bit" / "val" / "aachen" / "aachen_000000_000019_leftImg8bit.png")
        _save(mask, root / "gtFine" / "val" / "aachen" / f"aachen_000000_000019_gtFine_{suffix}.png")
        example = load_segmentation_dataset(root, "semantic", "val")[0]
        assert torch.equal(load_segmentation_dataset(root, "semantic", "validation")[0]["masks"], example["masks"])
        with pytest.raises(ValueError, match=r"has splits \['val'\], not 'test'"):
            load_segmentation_dataset(root, "semantic", "test")
        assert example["class_labels"].tolist() == sorted(set(np.unique(train_ids).tolist()) - {255})
        for mask_, label in zip(example["masks"], example["class_labels"]):
            assert torch.equal(mask_, torch.from_numpy(train_ids == int(label)))
    datasets.Dataset.from_dict(
        {"image": [Image.fromarray(_image(0))], "semantic_segmentation": [Image.fromarray(train_ids)]}
    ).save_to_disk(str(tmp_path / "cityscapes_table"))
    table = load_segmentation_dataset(tmp_path / "cityscapes_table", "semantic")
    assert table.id2label == benchmark_labels("cityscapes_semantic")
    assert table[0]["class_labels"].tolist() == example["class_labels"].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Users' own semantic folders
# ---------------------------------------------------------------------------------------------------------------


def _user_folder(root, masks: dict[str, np.ndarray], image_size=(12, 16)):
    for name, mask in masks.items():
        _save(_image(len(name), *image_size), root / "images" / f"{name}.jpg")
        _save(mask, root / "masks" / f"{name}.png")


def test_user_folder_integer_masks_with_merging_and_ignoring(tmp_path):
    mask = np.zeros((12, 16), np.uint8)
    mask[:, 4:8], mask[:, 8:12], mask[:, 12:] = 1, 2, 3
    mask[0, 0] = 255
    _user_folder(tmp_path, {"a": mask, "b": np.full((12, 16), 3, np.uint8)})
    classes = {0: None, 1: "road", 2: "road", 3: "car"}  # 0 ignored, 1 and 2 merged
    dataset = load_segmentation_dataset(tmp_path, "semantic", classes=classes)
    assert dataset.id2label == {0: "road", 1: "car"} and len(dataset) == 2
    example = dataset[0]
    assert example["class_labels"].tolist() == [0, 1]
    assert torch.equal(example["masks"][0], torch.from_numpy((mask == 1) | (mask == 2)))
    assert torch.equal(example["masks"][1], torch.from_numpy(mask == 3))
    # The same mapping from classes.json (JSON keys are strings), and raw ids as classes without a mapping.
    (tmp_path / "classes.json").write_text(json.dumps({str(k): v for k, v in classes.items()}))
    assert load_segmentation_dataset(tmp_path, "semantic").id2label == {0: "road", 1: "car"}
    (tmp_path / "classes.json").unlink()
    scanned = load_segmentation_dataset(tmp_path, "semantic")
    assert scanned.id2label == {k: f"class_{k}" for k in range(4)}
    assert scanned[0]["class_labels"].tolist() == [0, 1, 2, 3]


def test_user_folder_rgb_masks(tmp_path):
    mask = np.zeros((12, 16, 3), np.uint8)
    mask[:, :8] = (128, 64, 128)
    mask[:, 8:] = (220, 20, 60)
    mask[:2] = (0, 0, 0)
    _user_folder(tmp_path, {"a": mask})
    dataset = load_segmentation_dataset(
        tmp_path, "semantic", classes={"#804080": "road", (220, 20, 60): "person", "0,0,0": None}
    )
    example = dataset[0]
    assert dataset.id2label == {0: "road", 1: "person"}
    assert torch.equal(example["masks"][0], torch.from_numpy((mask == (128, 64, 128)).all(-1)))
    assert torch.equal(example["masks"][1], torch.from_numpy((mask == (220, 20, 60)).all(-1)))
    with pytest.raises(ValueError, match=r"unknown class value\(s\) \(0, 0, 0\)"):
        load_segmentation_dataset(tmp_path, "semantic", classes={"#804080": "road", "#dc143c": "person"})[0]
    with pytest.raises(ValueError, match="RGB-coded mask"):
        load_segmentation_dataset(tmp_path, "semantic", classes={0: "road"})[0]


def test_user_folder_errors(tmp_path):
    mask = np.ones((12, 16), np.uint8)
    _user_folder(tmp_path / "unmatched", {"a": mask})
    _save(_image(0), tmp_path / "unmatched" / "images" / "orphan.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask.*orphan"):
        load_segmentation_dataset(tmp_path / "unmatched", "semantic", classes={1: "x"})
    _user_folder(tmp_path / "unknown", {"a": np.full((12, 16), 7, np.uint8)})
    with pytest.raises(ValueError, match=r"unknown class value\(s\) 7.*add them to `classes`"):
        load_segmentation_dataset(tmp_path / "unknown", "semantic", classes={1: "x"})[0]
    _user_folder(tmp_path / "sizes", {"a": np.ones((10, 16), np.uint8)})
    with pytest.raises(ValueError, match="same size"):
        load_segmentation_dataset(tmp_path / "sizes", "semantic", classes={1: "x"})[0]


# ---------------------------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------------------------


def test_shapes_is_deterministic_and_well_formed():
    first, again, other_seed = (render_shapes_example(7, seed, (48, 64)) for seed in (3, 3, 4))
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other_seed["image"])
    assert SHAPES_STUFF_IDS == (3, 4, 5) and set(SHAPES_ID2LABEL) == set(range(6))
    for index in range(30):
        example = render_shapes_example(index, 0, 64)
        masks, labels = example["masks"], example["class_labels"]
        assert example["image"].shape == (3, 64, 64) and masks.shape[1:] == (64, 64)
        assert (masks.sum(0) == 1).all()  # a partition of the image, no empty segment
        assert masks.flatten(1).any(1).all()
        things = [label for label in labels.tolist() if label not in SHAPES_STUFF_IDS]
        stuff = [label for label in labels.tolist() if label in SHAPES_STUFF_IDS]
        assert 1 <= len(things) <= 4 and len(stuff) == len(set(stuff)) >= 1
        # Pixels of a thing are painted in its class's colour family (red circles, blue squares, yellow triangles).
        for mask, label in zip(masks, labels.tolist()):
            if label in (0, 1, 2):
                mean = example["image"][:, mask].float().mean(1)
                assert {0: mean.argmax() == 0, 1: mean.argmax() == 2, 2: mean.argmin() == 2}[label]
    train = load_segmentation_dataset("shapes", "panoptic", "train", num_examples=5, image_size=32)
    held_out = load_segmentation_dataset("shapes", "panoptic", "validation", num_examples=5, image_size=32)
    assert len(train) == 5 and train.stuff_ids == SHAPES_STUFF_IDS
    assert not torch.equal(train[0]["image"], held_out[0]["image"])


def test_hub_ids_load_through_datasets(tmp_path, monkeypatch):
    """Hub ids go to `datasets.load_dataset` (ADE20K via its parquet export); offline, the error says what to do."""
    annotation = np.zeros((12, 16), np.uint8)
    annotation[:, 8:] = 3
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": None, "path": _save(_image(0), tmp_path / "a.png")}],
            "annotation": [Image.fromarray(annotation)],
            "scene_category": [0],
        }
    )
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        if path == "someone/offline":
            raise ConnectionError("Couldn't reach 'someone/offline' on the Hub (OfflineModeIsEnabled)")
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_segmentation_dataset("zhoubolei/scene_parse_150", "semantic", "validation")
    assert calls[0] == ("zhoubolei/scene_parse_150", "validation",
                        {"revision": "refs/convert/parquet", "data_dir": "scene_parsing"})  # fmt: skip
    assert dataset.id2label == benchmark_labels("ade20k_semantic")
    example = dataset[0]
    assert example["class_labels"].tolist() == [2] and torch.equal(
        example["masks"][0], torch.from_numpy(annotation == 3)
    )
    with pytest.raises(OSError, match="local copy"):
        load_segmentation_dataset("someone/offline", "semantic")


def test_split_subfolders_and_pickling_for_workers(tmp_path):
    mask = np.zeros((12, 16), np.uint8)
    mask[6:] = 1
    for split, name in (("train", "t"), ("val", "v")):
        _save(_image(0), tmp_path / "images" / split / f"{name}.png")
        _save(mask, tmp_path / "masks" / split / f"{name}.png")
    dataset = load_segmentation_dataset(tmp_path, "semantic", "val", classes={0: "floor", 1: "wall"})
    assert len(dataset) == 1 and dataset.records[0][0].name == "v.png"
    validation = load_segmentation_dataset(tmp_path, "semantic", "validation", classes={0: "floor", 1: "wall"})
    assert [record[0].name for record in validation.records] == ["v.png"]  # "val", not every image
    assert len(load_segmentation_dataset("shapes", num_examples=5).select(range(3))) == 3
    # DataLoader workers receive the dataset pickled: every source must survive the round trip.
    augmented = load_segmentation_dataset("shapes", num_examples=2, image_size=32).with_transform(
        TrainTransform(32, (0.5, 1.0)), seed=1
    )
    for original in (dataset, augmented):
        restored = pickle.loads(pickle.dumps(original))
        assert torch.equal(restored[0]["masks"], original[0]["masks"])
