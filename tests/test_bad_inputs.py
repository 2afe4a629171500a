"""The bad-input table (issue 18): each kind of bad or odd input a user can give, by area, with what it must give,
either an error (its type, and a message naming the problem and the fix) or a correct result, checked by the row's
trigger (a warning, if the row names one, must say what was assumed).

A row is `(id, trigger, error, message)`: `error` is the exception type (`None` for a correct result) and `message` a
regex the error (or the logged warning) must match. Command-line rows run the entry points in-process and must fail
with one error line on stderr and no traceback (`OneLineError`). Kills during saves: test_fault_injection.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from modeling_eomt.configuration import IMAGENET_MEAN, IMAGENET_STD, TASKS
from modeling_eomt.convert.__main__ import main as convert_main
from PIL import Image
from safetensors.torch import load_file, save_file
from test_convert import original_config, original_state_dict, save_folder, tiny_flags, use_tiny_sizes
from test_post_processing import fake_outputs
from test_train import TINY as TRAIN_TINY
from test_train import train_args
from tiny_eomt import TINY
from transformers import pipeline

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor
from modeling_eomt.cli import main as segment_main
from modeling_eomt.training.train import main as train_main

SMALL = {"shortest_edge": 32, "longest_edge": 32}
RGB = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)


def rows(*table: tuple) -> list:
    """pytest params of rows `(id, *values)`; a row may end with marks (only a temporary xfail for another owner)."""
    return [
        pytest.param(*row[1:-1], id=row[0], marks=row[-1])
        if isinstance(row[-1], pytest.MarkDecorator)
        else pytest.param(*row[1:], id=row[0])
        for row in table
    ]


def expect(trigger: Callable[[], object], error: type[Exception] | None, message: str | None, caplog) -> None:
    """`trigger()` raises `error` matching `message`; or, with `error=None`, returns (having checked its result) and,
    if `message` is given, a warning matching it was logged."""
    if error is not None:
        with pytest.raises(error, match=message):
            trigger()
        return
    with caplog.at_level("WARNING"):
        trigger()
    if message is not None:
        assert any(re.search(message, record.getMessage()) for record in caplog.records), caplog.text


class OneLineError(Exception):
    """A command-line run that failed cleanly: a non-zero exit and one `<program>: error: ...` line on stderr."""


def command(main: Callable, *argv) -> None:
    """Run an entry point in-process; raise `OneLineError(<its error line>)` if it fails."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
    text = stderr.getvalue()
    assert "Traceback" not in text, text
    if code == 0:
        return
    errors = [line for line in text.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.match(r"eomt(-train|-convert)?: error: ", errors[0]), text
    raise OneLineError(errors[0])


# ---------------------------------------------------------------------------------------------------------- images
def constant(value, dtype, shape=(40, 40, 3)) -> np.ndarray:
    return np.full(shape, value, dtype)


def assert_grey_level(pixel_values: torch.Tensor, level: float) -> None:
    """Every pixel is the normalised grey `level` (0-1), as computed by hand from ImageNet's mean and std."""
    expected = (level - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixel_values, expected.view(1, 3, 1, 1).expand_as(pixel_values), atol=1e-5, rtol=0)


def process(*args, **kwargs):
    return EomtImageProcessor(size=SMALL)(*args, **kwargs)["pixel_values"]


def with_nan(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32) / 255
    image[3, 4, 1] = np.nan
    return image


IMAGES = rows(
    # 32896 = 128 · 257 is 16-bit grey 128/255: it must mean what 8-bit 128 means, not white or 257× too bright.
    ("uint16 array", lambda: assert_grey_level(process(constant(32896, np.uint16)), 128 / 255), None, None),
    ("PNG I;16", lambda: assert_grey_level(process(Image.fromarray(constant(32896, np.uint16, (40, 40)))), 128 / 255),
     None, None),
    ("int32 tensor of 16-bit values", lambda: assert_grey_level(process(torch.full((3, 40, 40), 32896,
                                                                                  dtype=torch.int32)), 128 / 255),
     None, None),
    ("float out of [0, 1]", lambda: assert_grey_level(process([constant(128, np.uint8), constant(128.0, np.float32)]),
                                                      128 / 255), None,
     r"Float image 1 has values in \[128, 128\], outside \[0, 1\]: taken as 0-255 levels"),
    ("float32 TIFF", lambda: assert_grey_level(process(Image.fromarray(constant(128.0, np.float32, (40, 40)), "F")),
                                               128 / 255), None, r"outside \[0, 1\]: taken as 0-255 levels"),
    ("float32 TIFF in [0, 1]", lambda: assert_grey_level(process(Image.fromarray(constant(0.5, np.float32, (40, 40)),
                                                                                 "F")), 0.5), None, None),
    ("float16 tensor", lambda: assert_grey_level(process(torch.full((3, 40, 40), 0.5, dtype=torch.float16)), 0.5),
     None, None),
    ("NaN pixel", lambda: process([RGB, with_nan(RGB)]), ValueError,
     r"Image 1 has NaN or infinite pixel values; replace them"),
    ("inf pixel", lambda: process(constant(np.inf, np.float32)), ValueError, r"Image 0 has NaN or infinite"),
    ("numpy object array", lambda: process(np.array([[None] * 4] * 4, dtype=object)), TypeError,
     r"Image 0 is a numpy array of dtype object; pass numbers"),
    ("image as a path", lambda: process("image.png"), TypeError,
     r"Unsupported image type str; pass PIL images, numpy arrays or torch tensors"),
    ("int above 8 bits", lambda: process(RGB.astype(np.int64) * 4), ValueError,
     r"values in \[0, 1020\], outside the 8-bit range 0-255: pass 16-bit images as uint16"),
    ("negative ints", lambda: process(RGB.astype(np.int16) - 300), ValueError, r"outside the 8-bit range"),
    ("two channels", lambda: process(np.zeros((20, 20, 2), np.uint8)), ValueError,
     r"Cannot find the channel axis of image 0 .*: expected 1, 3 or 4 channels first or last"),
    ("five channels first", lambda: process(np.zeros((5, 20, 20), np.uint8)), ValueError, r"channel axis"),
    ("empty image", lambda: process(np.zeros((0, 20, 3), np.uint8)), ValueError, r"Image 0 is empty"),
    ("size=-5", lambda: EomtImageProcessor(size=-5), ValueError, r"`size` must give a positive integer"),
    ("size=-5 in the call", lambda: EomtImageProcessor()(RGB, size=-5), ValueError, r"`size` must give a positive"),
    ("size=0", lambda: EomtImageProcessor(size=0), ValueError, r"`size` must give a positive integer"),
    ("size=2.5", lambda: EomtImageProcessor(size=2.5), ValueError, r"`size` must give a positive integer"),
    ("negative shortest_edge", lambda: EomtImageProcessor(size={"shortest_edge": -5}), ValueError, r"`size` must"),
    ("negative longest_edge", lambda: EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": -1}), ValueError,
     r"`size` must give a positive integer"),
    ("(H, W, 3) RGB label map", lambda: process(RGB, segmentation_maps=RGB), ValueError,
     r"RGB-encoded label map\? Convert it to one integer id per pixel"),
    ("label map of another size", lambda: process(RGB, segmentation_maps=np.zeros((10, 10), np.int64)), ValueError,
     r"has size \(10, 10\) but its image is \(45, 70\); pass maps at the size of their images"),
    ("label map with NaN", lambda: process(RGB, segmentation_maps=constant(np.nan, np.float32, (45, 70))), ValueError,
     r"Segmentation map 0 holds non-integer values .*; pass integer ids"),
    ("interpolated label map", lambda: process(RGB, segmentation_maps=constant(1.5, np.float32, (45, 70))), ValueError,
     r"Segmentation map 0 holds non-integer values .*resize maps with nearest-neighbour"),
    ("negative label id", lambda: process(RGB, segmentation_maps=constant(-3, np.int64, (45, 70))), ValueError,
     r"Segmentation map 0 holds the negative id -3; ids are non-negative integers"),
    ("image_mean of two values", lambda: EomtImageProcessor(image_mean=[0.5, 0.5]), ValueError,
     r"`image_mean` must be 3 finite numbers \(one per RGB channel\), got \[0.5, 0.5\]"),
    ("image_std of zero", lambda: process(RGB, image_std=[0.2, 0.0, 0.2]), ValueError,
     r"`image_std` must be 3 finite, positive numbers"),
    ("sizes differ without padding", lambda: process([RGB, RGB[:10]], do_pad=False), ValueError,
     r"cannot be batched without padding; pass `do_pad=True`"),
    ("unknown option", lambda: process(RGB, do_padding=True), ValueError,
     r"Unknown option\(s\) \['do_padding'\]; valid options: .*do_pad"),
    ("reduce labels without ignore_index", lambda: EomtImageProcessor(do_reduce_labels=True), ValueError,
     r"maps label 0 to `ignore_index`; set `ignore_index`"),
)  # fmt: skip


@pytest.mark.parametrize("trigger, error, message", IMAGES)
def test_images(trigger, error, message, caplog):
    expect(trigger, error, message, caplog)


# ----------------------------------------------------------------------------------------- model inputs (training)
def forward(pixels: torch.Tensor | None = None, training: bool = True, **labels) -> None:
    model = EomtForUniversalSegmentation(EomtConfig(**TINY)).train(training)
    model(torch.randn(1, 3, 64, 64) if pixels is None else pixels, **labels)


def targets(masks: torch.Tensor, classes) -> dict:
    return {"mask_labels": [masks], "class_labels": [classes]}


ONE = torch.tensor([1])
MODEL_INPUTS = rows(
    ("mask_labels of another size", lambda: forward(**targets(torch.ones(1, 32, 32), ONE)), ValueError,
     r"Image 0: `mask_labels` must be .* at the input size \(64, 64\), got \(1, 32, 32\); resize targets"),
    ("non-binary masks (0..255)", lambda: forward(**targets(torch.full((1, 64, 64), 255.0), ONE)), ValueError,
     r"Image 0: `mask_labels` must be binary \(0/1\).*; threshold them"),
    ("NaN masks", lambda: forward(**targets(torch.full((1, 64, 64), float("nan")), ONE)), ValueError,
     r"Image 0: `mask_labels` must be binary \(0/1\).*; threshold them"),
    ("float class_labels", lambda: forward(**targets(torch.ones(1, 64, 64), torch.tensor([1.0]))), ValueError,
     r"Image 0: `class_labels` must be a 1-D integer tensor, got torch.float32.*; pass class ids as `torch.long`"),
    ("list class_labels", lambda: forward(**targets(torch.ones(1, 64, 64), [1])), TypeError,
     r"Image 0.*must be tensors, e\.g\. `torch\.tensor\(\[1, 4\], dtype=torch\.long\)`"),
    ("class id >= num_labels", lambda: forward(**targets(torch.ones(1, 64, 64), torch.tensor([7]))), ValueError,
     r"Image 0: class ids must lie in \[0, 4\] \(`num_labels`=5\), got \[7\]"),
    ("class id = num_labels in eval", lambda: forward(training=False, **targets(torch.ones(1, 64, 64),
                                                                                 torch.tensor([5]))),
     ValueError, r"Image 0: class ids must lie in \[0, 4\] \(`num_labels`=5\), got \[5\]"),
    ("masks without a target axis", lambda: forward(**targets(torch.ones(64, 64), ONE)), ValueError,
     r"Image 0: `mask_labels` must be \(num_targets, height, width\)"),
    ("more masks than class labels", lambda: forward(**targets(torch.ones(2, 64, 64), ONE)), ValueError,
     r"Image 0: 2 target masks but 1 class labels; each mask needs exactly one class id"),
    ("masks without class labels", lambda: forward(mask_labels=[torch.ones(1, 64, 64)]), ValueError,
     r"Pass both `mask_labels` and `class_labels` to compute the loss, or neither"),
    ("3D pixel_values", lambda: forward(torch.randn(3, 64, 64)), ValueError,
     r"`pixel_values` must be a 4D tensor .*add a batch dimension"),
    ("4 channels", lambda: forward(torch.randn(1, 4, 64, 64)), ValueError,
     r"has 4 channels but the model expects 3; convert the images"),
    ("smaller than a patch", lambda: forward(torch.randn(1, 3, 8, 8)), ValueError,
     r"smaller than one 16×16 patch; resize the image"),
)  # fmt: skip


@pytest.mark.parametrize("trigger, error, message", MODEL_INPUTS)
def test_model_inputs(trigger, error, message, caplog):
    expect(trigger, error, message, caplog)


# ------------------------------------------------------------------------------------------------ post-processing
def post_process(task: str, target_sizes, images: int = 2, change: str | None = None, **options) -> None:
    outputs = fake_outputs(images)
    if change == "list":
        outputs = [outputs.class_queries_logits, outputs.masks_queries_logits]
    elif change == "shapes":
        outputs.masks_queries_logits = outputs.masks_queries_logits[:, 1:]
    elif change:  # NaN logits
        getattr(outputs, change)[0, 3, ..., 0] = float("nan")
    EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).post_process(
        outputs, task, target_sizes, **options
    )


SIZES = [(48, 80), (90, 40)]
POST_PROCESSING = rows(
    ("one size for two images", lambda task: post_process(task, [(48, 80)]), ValueError,
     r"Got 1 target sizes for 2 image\(s\) in the outputs; pass one \(height, width\) per image"),
    ("two sizes for one image", lambda task: post_process(task, SIZES, images=1), ValueError,
     r"Got 2 target sizes for 1 image\(s\) in the outputs; pass one \(height, width\) per image"),
    ("bare (H, W) tuple", lambda task: post_process(task, (48, 80)), ValueError,
     r"bare pair \(48, 80\); wrap it in a list"),
    ("(0, 0) size", lambda task: post_process(task, [(0, 0), (48, 80)]), ValueError,
     r"positive integers, got \(0, 0\)"),
    ("negative size", lambda task: post_process(task, [(48, -80), (48, 80)]), ValueError,
     r"positive integers, got \(48, -80\)"),
    ("no sizes", lambda task: post_process(task, None), ValueError, r"`target_sizes` is required"),
    ("threshold as a string", lambda task: post_process(task, SIZES, threshold="0.5"), TypeError,
     r"`threshold` must be a number between 0 and 1, got '0.5' \(str\)"),
    ("threshold above 1", lambda task: post_process(task, SIZES, threshold=1.5), ValueError,
     r"`threshold` must be between 0 and 1"),
    ("mask threshold NaN", lambda task: post_process(task, SIZES, mask_threshold=float("nan")), ValueError,
     r"`mask_threshold` must be between 0 and 1, got nan"),
    ("top_k=-1", lambda task: post_process(task, SIZES, top_k=-1), ValueError,
     r"`top_k` must be a positive integer \(or None .*\), got -1"),
    ("stuff classes by name", lambda task: post_process(task, SIZES, stuff_classes=["sky"]), TypeError,
     r"`stuff_classes` must be class ids \(integers\), got \['sky'\]"),
    ("NaN class logits", lambda task: post_process(task, SIZES, change="class_queries_logits"), ValueError,
     r"`class_queries_logits` has NaN or infinite values \(model input 0\).*check `pixel_values`"),
    ("NaN mask logits", lambda task: post_process(task, SIZES, change="masks_queries_logits"), ValueError,
     r"`masks_queries_logits` has NaN or infinite values \(model input 0\).*check `pixel_values`"),
    ("not model outputs", lambda task: post_process(task, SIZES, change="list"), TypeError,
     r"must carry `class_queries_logits` and `masks_queries_logits`: pass the model's output"),
    ("mismatched logits", lambda task: post_process(task, SIZES, change="shapes"), ValueError,
     r"got shapes \(2, 24, 7\) and \(2, 23, 16, 16\)"),
)  # fmt: skip


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("trigger, error, message", POST_PROCESSING)
def test_post_processing(task, trigger, error, message, caplog):
    """Every post-processing checks every argument before any work (an option one task ignores is still checked)."""
    expect(lambda: trigger(task), error, message, caplog)


# ------------------------------------------------------------------------------------------------- loading models
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    """A tiny model with a processor, whose architecture fits `eomt-train`'s shapes data (6 panoptic classes)."""
    folder = tmp_path_factory.mktemp("checkpoint")
    config = EomtConfig.from_preset("coco_panoptic_eomt_small_640_2x", **json.loads(TRAIN_TINY), num_labels=6)
    torch.manual_seed(0)
    EomtForUniversalSegmentation(config).save_pretrained(folder)
    EomtImageProcessor(size=SMALL).save_pretrained(folder)
    return folder


def truncate(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def corrupt_header(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"{garbage" + data[16:])
    return folder


def edit_weights(folder: Path, edit: Callable[[dict], dict]) -> Path:
    save_file(edit(load_file(folder / "model.safetensors")), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def with_nan_weight(weights: dict) -> dict:
    weights["mask_head.fc3.weight"][0, 0] = float("nan")
    return weights


def without_class_head(weights: dict) -> dict:
    return {name: value for name, value in weights.items() if not name.startswith("class_predictor")}


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def break_processor(folder: Path) -> Path:
    (folder / "preprocessor_config.json").write_text("{not json")
    return folder


def load(folder: Path, **kwargs):
    return EomtForUniversalSegmentation.from_pretrained(folder, **kwargs)


def load_without_head(folder: Path) -> None:
    _, info = load(edit_weights(folder, without_class_head), allow_missing_weights=True, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["class_predictor.bias", "class_predictor.weight"]


def segment(folder: Path) -> None:
    images = folder.parent / "images"
    images.mkdir()
    Image.fromarray(RGB).save(images / "street.png")
    command(segment_main, "segment", images, "--model", folder, "--output", folder.parent / "out")


def train(folder: Path, *extra: str, task: str = "panoptic") -> None:
    """`eomt-train` for one step from the checkpoint `folder`, its config unchanged."""
    args = train_args(folder.parent / "trained", task, steps=1, extra=("--save_strategy", "no"))
    args[args.index("--model_name_or_path") + 1] = str(folder)
    del args[args.index("--config_overrides") : args.index("--config_overrides") + 2]
    command(train_main, *args, *extra)


def train_with_overrides(folder: Path, overrides: str) -> None:
    args = train_args(folder.parent / "trained", steps=1)
    args[args.index("--config_overrides") + 1] = overrides
    command(train_main, *args)


LOADING = rows(
    ("truncated weights: from_pretrained", lambda f: load(truncate(f)), OSError,
     r"weights of .* cannot be read .*: the file is truncated or corrupt\. Download or copy the checkpoint again"),
    ("corrupt weights header: from_pretrained", lambda f: load(corrupt_header(f)), OSError,
     r"truncated or corrupt"),
    ("truncated weights: eomt segment", lambda f: segment(truncate(f)), OneLineError, r"truncated or corrupt"),
    ("truncated weights: eomt-train", lambda f: train(truncate(f)), OneLineError, r"truncated or corrupt"),
    ("NaN in the weights: from_pretrained", lambda f: load(edit_weights(f, with_nan_weight)), ValueError,
     r"NaN or infinite values in mask_head\.fc3\.weight: the weights are corrupt"),
    ("NaN in the weights: eomt segment", lambda f: segment(edit_weights(f, with_nan_weight)), OneLineError,
     r"NaN or infinite values in mask_head\.fc3\.weight"),
    ("broken preprocessor_config.json: from_pretrained", lambda f: EomtImageProcessor.from_pretrained(
        break_processor(f)), OSError, r"preprocessor_config\.json' is not a valid JSON file"),
    ("broken preprocessor_config.json: pipeline", lambda f: pipeline("image-segmentation", model=str(
        break_processor(f))), OSError, r"preprocessor_config\.json' is not a valid JSON file"),
    ("broken preprocessor_config.json: eomt segment", lambda f: segment(break_processor(f)), OneLineError,
     r"cannot load the processor config"),
    ("config.json field as a string: from_pretrained", lambda f: load(edit_config(f, num_queries="8")), TypeError,
     r"`num_queries` must be an integer, got '8' \(str\); write it without quotes in config\.json"),
    ("config.json field as a string: eomt segment", lambda f: segment(edit_config(f, num_queries="8")), OneLineError,
     r"`num_queries` must be an integer, got '8' \(str\)"),
    ("config.json field as a string: eomt-train", lambda f: train(edit_config(f, num_queries="8")), OneLineError,
     r"`num_queries` must be an integer, got '8' \(str\)"),
    ("config.json typo: eomt segment", lambda f: segment(edit_config(f, num_querys=8)), OneLineError,
     r"Unknown config field `num_querys`; did you mean `num_queries`"),
    ("config.json that does not fit the weights: from_pretrained", lambda f: load(edit_config(f, num_queries=7)),
     ValueError, r"weights of .* do not fit its config\.json .* or pass `ignore_mismatched_sizes=True`"),
    ("weights missing a head", lambda f: load(edit_weights(f, without_class_head)), ValueError,
     r"no weights for class_predictor\.bias, class_predictor\.weight.*allow_missing_weights=True"),
    ("weights missing a head, allowed", load_without_head, None, None),
    ("eomt-train: a checkpoint that does not fit its config", lambda f: train(
        f, "--config_overrides", '{"num_queries": 5}'), OneLineError,
     r"1 weight\(s\) of .* do not fit its config and would train from random \(query\.weight .*--config_overrides"),
    ("eomt-train: a checkpoint for another label set", lambda f: train(f, task="instance"), OneLineError,
     r"class head for another number of classes .*; pass --adapt_class_head"),
    ("eomt-train: --config_overrides typo", lambda f: train_with_overrides(f, '{"num_blokcs": 2}'), OneLineError,
     r"num_blokcs not a field of EomtConfig"),
    ("eomt-train: --config_overrides invalid", lambda f: train_with_overrides(f, 
        json.dumps({**json.loads(TRAIN_TINY), "num_blocks": 9})), OneLineError, r"`num_blocks` \(9\) must be between"),
    ("eomt-train: --config_overrides not JSON", lambda f: train_with_overrides(f, "num_blocks=2"), OneLineError,
     r"JSON object"),
)  # fmt: skip


@pytest.mark.parametrize("trigger, error, message", LOADING)
def test_loading_models(trigger, error, message, saved_checkpoint, tmp_path, caplog):
    folder = shutil.copytree(saved_checkpoint, tmp_path / "checkpoint")
    expect(lambda: trigger(folder), error, message, caplog)


# ------------------------------------------------------------------------------------------------- config fields
CONFIG_FIELDS = rows(
    ("integer as a string", lambda: EomtConfig(num_queries="32"), TypeError,
     r"`num_queries` must be an integer, got '32' \(str\); write it without quotes in config\.json"),
    ("integer as a float", lambda: EomtConfig(hidden_size=32.0, num_attention_heads=2), TypeError,
     r"`hidden_size` must be an integer, got 32.0 \(float\)"),
    ("number as a string", lambda: EomtConfig(layer_norm_eps="1e-6"), TypeError,
     r"`layer_norm_eps` must be a number, got '1e-6' \(str\); write it without quotes"),
    ("num_labels as a string", lambda: EomtConfig(num_labels="3"), TypeError,
     r"`num_labels` must be an integer, got '3' \(str\); write it without quotes"),
    ("typo", lambda: EomtConfig(num_querys=32), TypeError,
     r"Unknown config field `num_querys`; did you mean `num_queries`"),
    ("heads do not divide the width", lambda: EomtConfig(hidden_size=30, num_attention_heads=4), ValueError,
     r"`hidden_size` \(30\) must be divisible by `num_attention_heads` \(4\); pick a head count"),
    ("no query blocks", lambda: EomtConfig(num_blocks=0), ValueError, r"`num_blocks` \(0\) must be between 1"),
    ("more query blocks than layers", lambda: EomtConfig(num_hidden_layers=2, num_blocks=3), ValueError,
     r"`num_blocks` \(3\) must be between 1 and `num_hidden_layers` \(2\)"),
    ("image not a multiple of the patch", lambda: EomtConfig(image_size=100, patch_size=16), ValueError,
     r"`image_size` \(100\) must be a multiple of `patch_size` \(16\)"),
    ("no queries", lambda: EomtConfig(num_queries=0), ValueError, r"`num_queries` must be positive, got 0"),
    ("drop_path_rate above 1", lambda: EomtConfig(drop_path_rate=1.5), ValueError,
     r"`drop_path_rate` must lie in \[0, 1\], got 1.5"),
    ("non-square image", lambda: EomtConfig(image_size=(64, 32)), ValueError,
     r"`image_size` must be square, got \(64, 32\)"),
)  # fmt: skip


@pytest.mark.parametrize("trigger, error, message", CONFIG_FIELDS)
def test_config_fields(trigger, error, message, caplog):
    expect(trigger, error, message, caplog)


# ------------------------------------------------------------------------------------------------- training data
def folder_dataset(root: Path, unreadable: bool = True) -> Path:
    """images/ + masks/ of four 48×64 images (two classes), `images/2.jpg` truncated if `unreadable`."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True), (root / "masks").mkdir()
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"{index}.jpg")
        Image.fromarray(np.repeat(np.arange(2, dtype=np.uint8), 32)[None].repeat(48, 0)).save(
            root / "masks" / f"{index}.png"
        )
    if unreadable:
        broken = root / "images" / "2.jpg"
        broken.write_bytes(broken.read_bytes()[:300])
    return root


def train_on(dataset: Path, task: str = "semantic", *extra: str) -> None:
    args = train_args(dataset.parent / "out", task, steps=2, extra=("--save_strategy", "no"))
    args[args.index("--dataset_name") + 1] = str(dataset)
    args[args.index("--per_device_train_batch_size") + 1] = "4"
    command(train_main, *args, *extra)


def coco_json(tmp_path: Path, text: str) -> Path:
    (tmp_path / "coco.json").write_text(text)
    return tmp_path / "coco.json"


TRAINING_DATA = rows(
    ("unreadable image", lambda t: train_on(folder_dataset(t / "data")), OneLineError,
     r"cannot read .*images/2\.jpg: .*; replace or remove the file, or .*--skip_unreadable"),
    ("unreadable image, in a DataLoader worker", lambda t: train_on(
        folder_dataset(t / "data"), "semantic", "--dataloader_num_workers", "1"), OneLineError,
     r"cannot read .*images/2\.jpg: .*; replace or remove the file, or .*--skip_unreadable"),
    ("unreadable image with --skip_unreadable", lambda t: train_on(
        folder_dataset(t / "data"), "semantic", "--skip_unreadable"), None, r"Skipping unreadable .*images/2\.jpg"),
    ("COCO JSON that is not JSON", lambda t: train_on(coco_json(t, '{"images": ['), "panoptic"), OneLineError,
     r"coco\.json.*not valid JSON"),
    ("COCO JSON without file_name", lambda t: train_on(coco_json(
        t, '{"images": [{"id": 1}], "annotations": [], "categories": []}'), "panoptic"), OneLineError,
     r"coco\.json.*images\[0\].*'file_name'"),
    ("images/ + masks/ with --task panoptic", lambda t: train_on(folder_dataset(t / "data", False), "panoptic"),
     OneLineError, r"images/ and masks/.*--task semantic"),
)  # fmt: skip


@pytest.mark.parametrize("trigger, error, message", TRAINING_DATA)
def test_training_data(trigger, error, message, tmp_path, caplog):
    expect(lambda: trigger(tmp_path), error, message, caplog)


# ---------------------------------------------------------------------------------------------------- conversion
# Each trigger writes a source into the test's folder and gives `eomt-convert`'s arguments but the output folder.
def source(tmp_path: Path, name: str = "ckpt", class_head_value: float | None = None) -> Path:
    """An original checkpoint folder of the tiny architecture, with `class_head_value` in one class-head weight."""
    sd = original_state_dict()
    if class_head_value is not None:
        sd["network.class_head.weight"][3, 5] = class_head_value
    return save_folder(tmp_path / name, sd, original_config())


def damaged_over_a_good_model(tmp_path: Path, value: float) -> list:
    """A good conversion in the output folder, then a checkpoint whose class head holds `value`, with --overwrite."""
    command(convert_main, source(tmp_path, "good"), tmp_path / "converted" / "out", "--task", "panoptic",
            "--no-progress")  # fmt: skip
    return [source(tmp_path, "damaged", value), "--task", "panoptic", "--overwrite"]


def saved(tmp_path: Path, name: str, content, *args: str) -> list:
    """`content` (tensors, a checkpoint dict, or bytes of a damaged file) saved as `name`, then `args`."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".safetensors":
        save_file(content, path)
    else:
        torch.save(content, path)
    return [path, *args]


def truncated(tmp_path: Path, name: str) -> list:
    path = saved(tmp_path, name, original_state_dict())[0]
    return saved(tmp_path, name, path.read_bytes()[: path.stat().st_size // 2], "--task", "panoptic")


def folder_with(tmp_path: Path, edit: Callable[[dict], object] | None = None, config: str | None = None) -> list:
    """An original folder whose state dict `edit` changed in place, or whose config.json reads `config`."""
    sd = original_state_dict()
    if edit is not None:
        edit(sd)
    folder = save_folder(tmp_path / "ckpt", sd, original_config())
    if config is not None:
        (folder / "config.json").write_text(config)
    return [folder, "--task", "panoptic"]


def missing_shard(tmp_path: Path) -> list:
    folder = save_folder(tmp_path / "ckpt", original_state_dict(), original_config(), shards=2)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    return [folder]


class NotATensor:  # a pickled object a malicious checkpoint could use to run code
    pass


def non_empty_output(tmp_path: Path) -> list:
    (tmp_path / "converted" / "out").mkdir(parents=True)
    (tmp_path / "converted" / "out" / "keep.txt").write_text("mine")
    return [source(tmp_path), "--task", "panoptic"]


def flags(tmp_path: Path, *options: str) -> list:
    return [source(tmp_path), "--task", "panoptic", *options]


TIMM_VIT = {"blocks.0.attn.qkv.weight": torch.zeros(96, 32), "cls_token": torch.zeros(1, 1, 32)}
CONVERTED = {"layers.0.norm1.weight": torch.ones(32), "embeddings.cls_token": torch.zeros(1, 1, 32)}
CONVERSION = rows(
    ("NaN in the class head, over a good model", lambda t: damaged_over_a_good_model(t, float("nan")),
     r"'network\.class_head\.weight' holds 1 NaN or infinite values: the checkpoint is damaged"),
    ("inf in the class head, over a good model", lambda t: damaged_over_a_good_model(t, float("inf")),
     r"'network\.class_head\.weight' holds 1 NaN or infinite values"),
    ("text file renamed .bin", lambda t: saved(t, "weights.bin", b"<html>404: Not Found</html>", "--task", "panoptic"),
     r"is not a PyTorch checkpoint \(it starts with b'<htm'"),
    ("truncated .safetensors", lambda t: truncated(t, "weights.safetensors"), r"truncated or damaged"),
    ("truncated .bin", lambda t: truncated(t, "weights.bin"), r"not a readable PyTorch checkpoint"),
    ("non-JSON config.json", lambda t: folder_with(t, config="backbone: vit_small_patch14_reg4_dinov2\n"),
     r"config\.json is not valid JSON"),
    ("config.json contradicts the weights", lambda t: folder_with(t, config=json.dumps({**original_config(),
                                                                                        "num_queries": 9})),
     r"the source's config\.json sets num_queries=9, but the checkpoint's weights have num_queries=5"),
    ("flag contradicts the weights", lambda t: flags(t, "--num-queries", "9"),
     r"--num-queries 9 sets num_queries=9, but the checkpoint's weights have num_queries=5; drop or correct it"),
    ("preset contradicts the weights", lambda t: flags(t, "--preset", "coco_panoptic_eomt_small_640_2x"),
     r"sets image_size=640, but the checkpoint's weights have image_size=32"),
    ("backbone contradicts the weights", lambda t: flags(t, "--backbone", "giant", *[
        f"--{k.replace('_', '-')}={v}" for k, v in tiny_flags().items()]),
     r"--backbone giant sets hidden_size=48, but the checkpoint's weights have hidden_size=32"),
    ("another model's weights", lambda t: saved(t, "vit.bin", TIMM_VIT, "--backbone", "small", "--task", "panoptic"),
     r"not an original EoMT checkpoint"),
    ("already converted", lambda t: saved(t, "hf.bin", CONVERTED, "--backbone", "small"),
     r"already in the Transformers format"),
    ("missing file", lambda t: [t / "nowhere" / "pytorch_model.bin", "--backbone", "small"], r"does not exist"),
    ("missing shard", missing_shard, r"missing shard"),
    ("Hub id offline", lambda t: ["tue-mps/not_a_released_checkpoint"], r"could not be downloaded"),
    ("unknown backbone", lambda t: saved(t, "weights.bin", original_state_dict(), "--backbone",
                                         "vit_huge_patch14_clip_224"), r"Unknown backbone"),
    ("DINOv3 backbone for DINOv2 weights", lambda t: saved(t, "weights.bin", original_state_dict(), "--backbone",
                                                           "vit_large_patch16_dinov3.lvd1689m"), r"DINOv3"),
    ("unknown key", lambda t: folder_with(t, lambda sd: sd.update({"network.extra_head.weight": torch.zeros(3)})),
     r"'network\.extra_head\.weight'"),
    ("missing key", lambda t: folder_with(t, lambda sd: sd.pop("network.encoder.backbone.blocks.2.ls1.gamma")),
     r"'network\.encoder\.backbone\.blocks\.2\.ls1\.gamma'"),
    ("pickled object", lambda t: saved(t, "unsafe.ckpt", {"state_dict": original_state_dict(),
                                                           "hyper_parameters": NotATensor()}, "--backbone", "small"),
     r"never unpickled"),
    ("negative mask probabilities", lambda t: saved(t, "weights.bin", original_state_dict(mask_probs=-1.0), "--task",
                                                    "panoptic"), r"outside \[0, 1\]"),  # DINOv2 stores them raw
    ("no task for 7 labels", lambda t: saved(t, "weights.bin", original_state_dict()), r"pass --task"),
    ("non-empty output without --overwrite", non_empty_output, r"is not empty.*--overwrite"),
    ("negative --atol", lambda t: flags(t, "--atol", "-1"), r"--atol must be a positive tolerance, got -1\.0"),
    ("output is the source", lambda t: [source(t, "converted/out"), "--task", "panoptic", "--overwrite"],
     r"OUTPUT_DIR .*out holds the source .*out, which replacing it would delete; pick another folder"),
    ("output holds the source", lambda t: [source(t, "converted/out/ckpt"), "--task", "panoptic", "--overwrite"],
     r"OUTPUT_DIR .*out holds the source .*out/ckpt"),
)  # fmt: skip


def files(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("make_args, message", CONVERSION)
def test_conversion(make_args, message, tmp_path, monkeypatch):
    """One error line, and nothing written or replaced (with --overwrite, the good model stays)."""
    use_tiny_sizes(monkeypatch)
    args = make_args(tmp_path)
    before = files(tmp_path)
    with pytest.raises(OneLineError, match=message):
        command(convert_main, *args, tmp_path / "converted" / "out", "--no-progress")
    assert files(tmp_path) == before
