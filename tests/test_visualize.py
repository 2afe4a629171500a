"""Overlays: segments tinted in their class colour, white outlines, labels inside segments, a legend; the rest of the
image untouched."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from modeling_eomt.visualize import SegmentTally, draw_overlay, label_colour

GREY = 100


@pytest.fixture
def overlay_case():
    image = Image.fromarray(np.full((240, 320, 3), GREY, np.uint8))
    ids = torch.full((240, 320), -1)
    ids[:, :160] = 0  # left half: a cat
    ids[120:, 160:] = 1  # bottom right: the sky
    segments = [{"id": 0, "label_id": 0, "score": 0.9}, {"id": 1, "label_id": 2}]
    return image, ids, segments


def test_overlay_tints_outlines_labels_and_keeps_the_rest(overlay_case):
    image, ids, segments = overlay_case
    overlay = draw_overlay(image, ids, segments, {0: "cat", 2: "sky"}, alpha=0.5)
    assert overlay.size == image.size and overlay.mode == "RGB"
    pixels = np.asarray(overlay).astype(int)

    untouched = pixels[5:115, 170:315]  # top right has no segment (and no legend or label)
    assert (untouched == GREY).all()
    # away from outlines and labels, each segment is half its class colour
    for label_id, patch in [(0, pixels[150:230, 5:40]), (2, pixels[125:140, 280:315])]:
        expected = np.round(0.5 * GREY + 0.5 * np.array(label_colour(label_id)))
        assert (np.abs(patch - expected) <= 1).all(), label_id

    # outlines: white where a segment meets another segment or the void
    assert (pixels[200, 159] == 255).all() and (pixels[200, 160] == 255).all()
    assert (pixels[120, 240] == 255).all() and (pixels[119, 240] == GREY).all()

    # the legend (top left, black box) has a swatch in each class colour, and each label box sits inside its segment
    legend = pixels[:40, :80].reshape(-1, 3)
    for label_id in (0, 2):
        assert (np.abs(legend - label_colour(label_id)) <= 1).all(1).any(), label_id
    boxes, count = ndimage.label((pixels == 0).all(-1))  # black: the legend and one label box per segment
    sizes = ndimage.sum_labels(np.ones(boxes.shape), boxes, range(count + 1))
    labels = [box for box in range(1, count + 1) if boxes[2, 2] != box and sizes[box] > 30]  # not holes in letters
    centres = [np.argwhere(boxes == box).mean(0).astype(int) for box in labels]
    assert sorted(int(ids[row, col]) for row, col in centres) == [0, 1]
    for box in labels:
        (top, left), (bottom, right) = np.argwhere(boxes == box).min(0), np.argwhere(boxes == box).max(0)
        assert (pixels[top:bottom, left:right].min(-1) >= 200).any()  # light text on it


def test_overlay_size_mismatch_is_an_error(overlay_case):
    image, ids, segments = overlay_case
    with pytest.raises(ValueError, match="does not match the image"):
        draw_overlay(image, ids[:, :200], segments)


@pytest.mark.parametrize("band_rows", [1, 7, 64])
def test_boxes_grown_band_by_band_are_each_labels_bounding_box(band_rows):
    # One pass over the map finds every segment's box (labels are placed inside it); oracle: np.argwhere per label.
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 48), dtype=np.int64)
    for label in range(1, 6):
        top, left = rng.integers(0, 40, 2)
        labels[top : top + rng.integers(1, 24), left : left + rng.integers(1, 24)] = label
    tally = SegmentTally(labels - 1, range(6))  # segment ids: label − 1; background: void
    for top in range(0, labels.shape[0], band_rows):
        tally.add(labels[top : top + band_rows] - 1, top)
    boxes = {label: tally.box(label - 1) for label in range(1, 6) if tally.box(label - 1) is not None}
    expected = {}
    for label in np.unique(labels[labels > 0]):
        (top, left), (bottom, right) = np.argwhere(labels == label).min(0), np.argwhere(labels == label).max(0)
        expected[int(label)] = [left, top, right + 1, bottom + 1]
    assert boxes == expected


def test_a_tally_made_by_the_caller_gives_the_same_overlay_and_must_cover_the_ids(overlay_case):
    # `eomt segment` tallies areas and boxes in its RLE pass over columns; the overlay then skips its own tally.
    image, ids, segments = overlay_case
    ids = ids.numpy()
    segment_ids = [s["id"] for s in segments]
    tally = SegmentTally(ids, segment_ids)
    for left in range(0, ids.shape[1], 7):
        tally.add(ids[:, left : left + 7], left=left)
    assert np.array_equal(
        np.asarray(draw_overlay(image, ids, segments, tally=tally)), np.asarray(draw_overlay(image, ids, segments))
    )
    with pytest.raises(ValueError, match="does not cover every id"):
        draw_overlay(image, ids, segments, tally=SegmentTally(np.zeros((1, 1), dtype=np.int64), []))
