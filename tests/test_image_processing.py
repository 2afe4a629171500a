"""EomtImageProcessor: defaults, input kinds, parity with the built-in processor (oracle), training targets,
Hub-config loading (bad inputs: test_bad_inputs.py)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil as BuiltinProcessor

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor

SMALL = {"shortest_edge": 32, "longest_edge": 32}
ONE_GREY_LEVEL = 1 / 255 / 0.224 + 1e-4  # largest normalised difference of a ±1 rounding in resizing


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)


def test_defaults_make_any_image_a_640_square():
    processor = EomtImageProcessor()
    sizes = [(480, 640), (30, 1000), (2000, 700), (640, 640), (1, 5000), (5000, 1), (1, 1)]
    images = [np.full((height, width, 3), 200, dtype=np.uint8) for height, width in sizes]
    for image in images:
        assert processor(image)["pixel_values"].shape == (1, 3, 640, 640)
    # ... which a model at its default image size accepts
    config = EomtConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_blocks=1)
    model = EomtForUniversalSegmentation(config).eval()
    with torch.no_grad():
        outputs = model(**processor(images))
    assert outputs.class_queries_logits.shape[0] == len(sizes) and bool(outputs.masks_queries_logits.isfinite().all())


def test_batch_of_different_sizes_is_padded_to_one_tensor(rgb):
    batch = EomtImageProcessor(size=SMALL)([rgb, rgb[:20], rgb.transpose(1, 0, 2)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert "patch_offsets" not in batch


def test_input_kinds_agree(rgb):
    processor = EomtImageProcessor(size=SMALL)
    reference = processor(Image.fromarray(rgb))["pixel_values"]
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    variants = {
        "numpy HWC uint8": rgb,
        "numpy CHW uint8": rgb.transpose(2, 0, 1),
        "torch CHW uint8": chw,
        "torch HWC uint8": torch.from_numpy(rgb),
        "numpy float [0,1]": rgb.astype(np.float32) / 255,
        "torch float [0,255]": chw.float(),
        "numpy float64 [0,1]": rgb.astype(np.float64) / 255,
        "RGBA": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGBA"),
        "numpy RGBA": np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]),
        "torch RGBA CHW": torch.cat([chw, torch.full((1, *rgb.shape[:2]), 7, dtype=torch.uint8)]),
        "PIL palette": Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE).convert("P"),
        "4-d batch": chw[None],
        "list": [Image.fromarray(rgb)],
        "ambiguous 3×45×3, channels_first": (rgb[:, :3].transpose(2, 0, 1), "channels_first"),
    }
    for name, image in variants.items():
        image, data_format = image if isinstance(image, tuple) else (image, None)
        got = processor(image, input_data_format=data_format)["pixel_values"]
        if name == "PIL palette":  # quantised colours: same layout, a few grey levels off
            assert got.shape == reference.shape and (got - reference).abs().mean() < 10 * ONE_GREY_LEVEL
            continue
        if data_format:  # a 45×3 strip of the image, which alone is ambiguous (3 first and last)
            expected = processor(Image.fromarray(np.ascontiguousarray(rgb[:, :3])))["pixel_values"]
            assert (got - expected).abs().max() <= ONE_GREY_LEVEL, name
            continue
        assert got.shape == reference.shape, name
        assert (got - reference).abs().max() <= ONE_GREY_LEVEL, name

    # greys, in every layout, are the RGB image with three equal channels
    grey = rgb[..., 0]
    same = processor(np.repeat(grey[..., None], 3, axis=2))["pixel_values"]
    for image in (Image.fromarray(grey), grey, grey[..., None], torch.from_numpy(grey)[None]):
        assert (processor(image)["pixel_values"] - same).abs().max() <= ONE_GREY_LEVEL, type(image)
    from_grey = processor(Image.fromarray(grey))["pixel_values"]
    assert (from_grey[:, 0] * 0.229 + 0.485 - (from_grey[:, 1] * 0.224 + 0.456)).abs().max() < 1e-5
    np_batch = processor(np.stack([rgb, rgb]), return_tensors="np")["pixel_values"]
    assert isinstance(np_batch, np.ndarray) and np_batch.shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "options",
    [
        {"do_rescale": False},
        {"do_normalize": False},
        {"resample": 0},
        {"resample": 3},
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.5, 0.6, 0.7]},
        {"rescale_factor": 1 / 127.5},
        {"do_resize": False},
    ],
)
def test_options_match_builtin(rgb, options):
    image = rgb[:20, :30] if options.get("do_resize") is False else rgb  # unresized, it must fit the canvas
    ours = EomtImageProcessor(size=SMALL, **options)(image)["pixel_values"]
    builtin = BuiltinProcessor(size=SMALL, do_pad=True, **options)(images=[image], return_tensors="pt")
    # one grey level of resizing rounding, in the units the options give
    grey = options.get("rescale_factor", 1 / 255) if options.get("do_rescale", True) else 1.0
    if options.get("do_normalize", True):
        grey /= min(options.get("image_std", [0.229, 0.224, 0.225]))
    assert ours.shape == builtin["pixel_values"].shape == (1, 3, 32, 32)
    assert (ours - builtin["pixel_values"]).abs().max() <= grey * 1.001


def test_padded_panoptic_inputs_match_builtin(rgb):
    ours = EomtImageProcessor(size=SMALL)(rgb)["pixel_values"]
    builtin = BuiltinProcessor(size=SMALL, do_pad=True)(images=[rgb], return_tensors="pt")["pixel_values"]
    assert ours.shape == builtin.shape == (1, 3, 32, 32)
    assert (ours - builtin).abs().max() <= ONE_GREY_LEVEL
    # the padding is zero in pixel space, i.e. -mean/std after normalisation
    torch.testing.assert_close(
        ours[0, :, -1, -1], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    )


@pytest.mark.parametrize("shape", [(45, 70), (70, 45), (32, 100), (40, 40)])
def test_sliding_windows_match_builtin(rgb, shape):
    size = {"shortest_edge": 16, "longest_edge": None}
    image = np.resize(rgb, (*shape, 3))
    ours = EomtImageProcessor(size=size, do_split_image=True, do_pad=False)(image)
    builtin = BuiltinProcessor(size=size, do_split_image=True)(images=[image], return_tensors="pt")
    assert [o.tolist() for o in ours["patch_offsets"]] == [o.tolist() for o in builtin["patch_offsets"]]
    assert ours["pixel_values"].shape == builtin["pixel_values"].shape
    assert (ours["pixel_values"] - builtin["pixel_values"]).abs().max() <= ONE_GREY_LEVEL


def test_resized_size_follows_the_hub_rounding():
    processor = EomtImageProcessor(size={"shortest_edge": 640, "longest_edge": 640})
    semantic = EomtImageProcessor(size={"shortest_edge": 512, "longest_edge": None})
    rng = np.random.default_rng(1)
    for height, width in rng.integers(20, 3000, (300, 2)).tolist() + [[427, 640], [1000, 1500], [333, 1001]]:
        assert processor.resized_size(height, width) == get_size_with_aspect_ratio((height, width), 640, 640)
        assert semantic.resized_size(height, width) == get_size_with_aspect_ratio((height, width), 512, None)


def test_semantic_targets_match_builtin_with_label_reduction():
    rng = np.random.default_rng(2)
    label_map = rng.integers(0, 5, (40, 64)).astype(np.int64)
    label_map[:10] = 0  # background → ignored
    image = np.zeros((40, 64, 3), np.uint8)
    ours = EomtImageProcessor(size=SMALL, ignore_index=255, do_reduce_labels=True)(image, segmentation_maps=label_map)
    builtin = BuiltinProcessor(size=SMALL, do_pad=True, ignore_index=255)(
        images=[image], segmentation_maps=[label_map], return_tensors="pt"
    )
    torch.testing.assert_close(ours["class_labels"][0], builtin["class_labels"][0])
    torch.testing.assert_close(ours["mask_labels"][0], builtin["mask_labels"][0])
    assert ours["class_labels"][0].tolist() == [0, 1, 2, 3]
    masks = ours["mask_labels"][0]
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.float32
    assert masks[:, 20:].sum() == 0  # padding rows belong to no target
    assert masks.sum(0).max() == 1  # one label per pixel
    processor = EomtImageProcessor(size=SMALL, ignore_index=255, do_reduce_labels=True)
    for kind in (Image.fromarray(label_map.astype(np.uint8)), torch.from_numpy(label_map), label_map[None]):
        same = processor(image, segmentation_maps=kind)
        assert torch.equal(same["class_labels"][0], ours["class_labels"][0]), type(kind)
        assert torch.equal(same["mask_labels"][0], ours["mask_labels"][0]), type(kind)
    as_numpy = processor(image, segmentation_maps=label_map, return_tensors="np")
    assert isinstance(as_numpy["mask_labels"][0], np.ndarray)
    np.testing.assert_array_equal(as_numpy["class_labels"][0], ours["class_labels"][0].numpy())


def test_instance_targets_use_the_mapping():
    label_map = np.zeros((32, 32), np.int64)
    label_map[:16, :16], label_map[16:, :] = 3, 7
    label_map[:16, 16:] = 255
    mapping = {0: 0, 3: 12, 7: 5}
    out = EomtImageProcessor(size=SMALL, ignore_index=255, do_reduce_labels=False)(
        np.zeros((32, 32, 3), np.uint8), segmentation_maps=[label_map], instance_id_to_semantic_id=[mapping]
    )
    assert out["class_labels"][0].tolist() == [12, 5]  # instances 3 and 7 in ascending order; 255 ignored
    masks = out["mask_labels"][0]
    assert masks.sum((1, 2)).tolist() == [256, 512]
    assert masks[0, :16, :16].all() and masks[1, 16:].all() and masks[:, :16, 16:].sum() == 0
    with pytest.raises(ValueError, match="Instance id 7 is missing"):
        EomtImageProcessor(size=SMALL)(
            np.zeros((32, 32, 3), np.uint8), segmentation_maps=[label_map], instance_id_to_semantic_id={3: 1}
        )


@pytest.mark.parametrize("instances", [False, True])
def test_hub_ignore_index_means_what_the_builtin_makes_of_it(tmp_path, instances):
    """A Hub config with `ignore_index` and no `do_reduce_labels`: label 0 is ignored and the others shift down, as in
    transformers' processor (the oracle), with and without an instance → class mapping."""
    rng = np.random.default_rng(4)
    label_map = rng.integers(0, 6, (40, 64)).astype(np.int64)
    label_map[:8] = 0
    mapping = {i: (3 * i) % 7 for i in range(6)} if instances else None
    image = np.zeros((40, 64, 3), np.uint8)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "EomtImageProcessor", "size": SMALL, "do_pad": True, "ignore_index": 255})
    )
    ours = AutoImageProcessor.from_pretrained(tmp_path)(
        image, segmentation_maps=label_map, instance_id_to_semantic_id=mapping
    )
    builtin = BuiltinProcessor(size=SMALL, do_pad=True, ignore_index=255)(
        images=[image], segmentation_maps=[label_map], instance_id_to_semantic_id=mapping, return_tensors="pt"
    )
    assert ours["class_labels"][0].tolist() == builtin["class_labels"][0].tolist()
    torch.testing.assert_close(ours["mask_labels"][0], builtin["mask_labels"][0])
    explicit = EomtImageProcessor(size=SMALL, ignore_index=255, do_reduce_labels=False)(
        image, segmentation_maps=label_map
    )
    assert explicit["class_labels"][0].tolist() == sorted(set(label_map.ravel().tolist()))  # 0 kept as a class


def test_targets_follow_windows():
    size = {"shortest_edge": 16, "longest_edge": None}
    label_map = np.zeros((16, 40), np.int64)
    label_map[:, 20:] = 1
    out = EomtImageProcessor(size=size, do_split_image=True, do_pad=False)(
        np.zeros((16, 40, 3), np.uint8), segmentation_maps=label_map
    )
    assert len(out["mask_labels"]) == len(out["patch_offsets"]) == 3
    assert [c.tolist() for c in out["class_labels"]] == [[0], [0, 1], [1]]


def test_hub_config_loads_unchanged_through_auto(tmp_path):
    hub_config = {
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "do_split_image": False,
        "ignore_index": None,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "EomtImageProcessorFast",
        "image_std": [0.229, 0.224, 0.225],
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 640, "shortest_edge": 640},
    }
    # every class name transformers saves for EoMT's processor, under every backend, loads ours
    for name in ("EomtImageProcessorFast", "EomtImageProcessor", "EomtImageProcessorPil"):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**hub_config, "image_processor_type": name}))
        for backend in (None, "pil", "torchvision"):
            processor = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
            assert isinstance(processor, EomtImageProcessor), (name, backend)
            assert processor.size == {"shortest_edge": 640, "longest_edge": 640} and processor.do_pad
    processor = AutoImageProcessor.from_pretrained(tmp_path, do_split_image=True)
    assert isinstance(processor, EomtImageProcessor) and processor.do_split_image

    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    assert reloaded.to_dict() == processor.to_dict()


@pytest.mark.parametrize("split", [False, True])
def test_return_tensors_none_gives_what_the_builtin_gives(rgb, split):
    """Without `return_tensors`, as transformers' processor: `pixel_values` a list of float32 arrays, one per model
    input; targets and window offsets as tensors."""
    size = {"shortest_edge": 16, "longest_edge": None} if split else SMALL
    label_map = np.random.default_rng(5).integers(0, 4, rgb.shape[:2])
    ours = EomtImageProcessor(size=size, do_split_image=split, do_pad=not split)
    builtin = BuiltinProcessor(size=size, do_split_image=split, do_pad=not split)
    mine = ours([rgb, rgb[:30]] if not split else rgb, segmentation_maps=None, return_tensors=None)
    theirs = builtin(images=[rgb, rgb[:30]] if not split else [rgb], return_tensors=None)
    assert isinstance(mine["pixel_values"], list) and len(mine["pixel_values"]) == len(theirs["pixel_values"])
    for array, expected in zip(mine["pixel_values"], theirs["pixel_values"]):
        assert type(array) is type(expected) is np.ndarray and array.dtype == expected.dtype == np.float32
        assert array.shape == expected.shape and np.abs(array - expected).max() <= ONE_GREY_LEVEL
    if split:
        assert [o.tolist() for o in mine["patch_offsets"]] == [o.tolist() for o in theirs["patch_offsets"]]
        assert all(torch.is_tensor(o) for o in mine["patch_offsets"])
    targets = ours(rgb, segmentation_maps=label_map, return_tensors=None)
    reference = builtin(images=[rgb], segmentation_maps=[label_map], return_tensors=None)
    for name in ("mask_labels", "class_labels"):
        assert all(torch.is_tensor(t) for t in targets[name] + reference[name]), name
        assert [t.shape for t in targets[name]] == [t.shape for t in reference[name]], name


def test_patch_offsets_are_present_exactly_when_splitting(rgb):
    """One rule for every `return_tensors`: `patch_offsets` exist when the processor cuts windows, and the model hands
    them to its output unchanged, where post-processing finds them."""
    config = EomtConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_blocks=1, image_size=16
    )
    model = EomtForUniversalSegmentation(config).eval()
    for split in (False, True):
        processor = EomtImageProcessor(
            size={"shortest_edge": 16, "longest_edge": None if split else 16}, do_split_image=split, do_pad=not split
        )
        for return_tensors in (None, "pt", "np"):
            assert ("patch_offsets" in processor(rgb, return_tensors=return_tensors)) == split, return_tensors
        inputs = processor(rgb)
        with torch.no_grad():
            outputs = model(**inputs)
        assert outputs.patch_offsets is inputs.get("patch_offsets")
        assert processor.post_process_semantic_segmentation(outputs, [rgb.shape[:2]])[0].shape == rgb.shape[:2]


def test_none_options_survive_a_save_round_trip(tmp_path):
    """transformers' `to_dict` drops `None` values; ours keeps every option, so an explicit `None` (no cap on the long
    side, no ignore index, label reduction left to follow `ignore_index`) comes back as `None`."""
    processor = EomtImageProcessor(
        size={"shortest_edge": 32, "longest_edge": None}, ignore_index=None, do_reduce_labels=None, do_split_image=True
    )
    saved = processor.to_dict()
    assert (
        saved["ignore_index"] is None and saved["do_reduce_labels"] is None and saved["size"]["longest_edge"] is None
    )
    assert EomtImageProcessor.from_dict(saved).to_dict() == saved
    processor.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert stored["ignore_index"] is None and stored["do_reduce_labels"] is None
    assert AutoImageProcessor.from_pretrained(tmp_path).to_dict() == saved
    explicit = EomtImageProcessor(ignore_index=255, do_reduce_labels=False)
    assert EomtImageProcessor.from_dict(explicit.to_dict()).do_reduce_labels is False


def test_pil_alias_saves_the_type_transformers_saves(tmp_path):
    from modeling_eomt.image_processing import EomtImageProcessorPil

    expected = BuiltinProcessor().to_dict()["image_processor_type"]  # transformers' PIL backend saves this name
    EomtImageProcessorPil(size=SMALL).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"] == expected
    assert EomtImageProcessor().to_dict()["image_processor_type"] == expected
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), EomtImageProcessor)
