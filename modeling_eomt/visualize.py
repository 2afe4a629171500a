"""Overlay drawing for segmentations: coloured, outlined and labelled segments with a legend (pillow + numpy)."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

MAX_LEGEND_ENTRIES = 12
# Pixels of a band of rows of the overlay; most pixels of a segment's box searched for its label's place.
BAND_PIXELS = 2**20
LABEL_PIXELS = 2**20


def label_colour(label_id: int) -> tuple[int, int, int]:
    """A bright colour per class, stable across images (golden-ratio hue steps keep neighbours apart)."""
    hue = (label_id * 0.618033988749895) % 1.0
    saturation = 0.65 + 0.35 * ((label_id * 7) % 3) / 2
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_overlay(
    image: Image.Image,
    segmentation: torch.Tensor | np.ndarray,
    segments_info: Sequence[Mapping],
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.5,
    tally: SegmentTally | None = None,
) -> Image.Image:
    """
    Draw segments over an image.

    Args:
        image: The original image; the result has its size.
        segmentation: `(height, width)` segment ids (-1 or any id not in `segments_info` is left uncoloured).
        segments_info: `{"id", "label_id", "score"?}` per segment (the post-processing format).
        id2label: Class names; missing ones are shown as their id.
        alpha: Opacity of the segment colours.
        tally: A [`SegmentTally`] of the whole `segmentation` over `segments_info`'s ids, when the caller already
            made one (e.g. while encoding RLEs); else the overlay's own pass over the map makes it.

    Returns:
        An RGB image with each segment tinted in its class colour, white outlines between segments, the label (and
        score) at each segment's most interior point, and a legend of the classes present.
    """
    id2label = id2label or {}
    base = image if image.mode == "RGB" else image.convert("RGB")
    ids = np.asarray(segmentation.cpu() if torch.is_tensor(segmentation) else segmentation, dtype=np.int64)
    if ids.shape != (base.height, base.width):
        raise ValueError(f"Segmentation of shape {ids.shape} does not match the image ({base.height}, {base.width}).")

    known = {int(s["id"]): s for s in segments_info}
    counted = tally is not None
    if not counted:
        tally = SegmentTally(ids, known)
    elif max(known, default=-1) + 2 > tally.size:
        raise ValueError("`tally` does not cover every id of `segments_info`; make it over those ids, or pass None.")
    colours = np.zeros((tally.size, 3), dtype=np.float32)
    tinted = np.zeros(tally.size, dtype=bool)  # index 0 (void) never is
    for segment_id, segment in known.items():
        colours[segment_id + 1] = label_colour(int(segment["label_id"]))
        tinted[segment_id + 1] = True
    # A band of rows at a time: float RGB temporaries of a whole 10000×10000 image would take several GB.
    canvas = base.copy()
    height, width = ids.shape
    step = max(1, BAND_PIXELS // width)
    for top in range(0, height, step):
        bottom = min(height, top + step)
        lookup = tally.index(ids[top:bottom]) if counted else tally.add(ids[top:bottom], top)
        band = np.asarray(base.crop((0, top, width, bottom)), dtype=np.float32)
        band = np.where(tinted[lookup][..., None], (1 - alpha) * band + alpha * colours[lookup], band)
        # outlines need the rows above and below the band
        above, below = min(top, 1), min(height - bottom, 1)
        around = ids[top - above : bottom + below]
        edges = _boundaries(np.where(tinted[tally.index(around)], around, -1))
        band[edges[above : above + bottom - top]] = 255
        canvas.paste(Image.fromarray(band.round().astype(np.uint8)), (0, top))

    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, min(base.size) // 40))
    for segment_id, segment in known.items():
        point = _interior_point(ids, segment_id, tally.box(segment_id))
        if point is None:
            continue
        text = _name(int(segment["label_id"]), id2label)
        if segment.get("score") is not None:
            text += f" {segment['score']:.2f}"
        _text_box(draw, point, text, font, anchor="mm")
    _legend(draw, known.values(), tally.areas[1:], id2label, font)
    return canvas


def _boundaries(ids: np.ndarray) -> np.ndarray:
    """Segment pixels with a 4-neighbour of another id."""
    edge = np.zeros(ids.shape, dtype=bool)
    vertical, horizontal = ids[1:] != ids[:-1], ids[:, 1:] != ids[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge & (ids >= 0)


class SegmentTally:
    """Pixels and bounding box of every segment id of a map, gathered band by band (rows for the overlay, columns for
    RLEs). Ids index a table at id + 1; negative ids (void) share index 0."""

    def __init__(self, ids: np.ndarray, segment_ids: Iterable[int]) -> None:
        self.size = max([int(ids.max(initial=-1)), *segment_ids]) + 2
        self.areas = np.zeros(self.size, dtype=np.int64)
        self.boxes: dict[int, list[int]] = {}  # index → [left, top, right, bottom], right and bottom exclusive

    def index(self, ids: np.ndarray) -> np.ndarray:
        """The table index of each pixel of `ids`."""
        return np.clip(ids, -1, self.size - 2) + 1

    def add(self, band: np.ndarray, top: int = 0, left: int = 0) -> np.ndarray:
        """Count `band`, whose first pixel is at (`top`, `left`) of the map; returns its table indices."""
        index = self.index(band)
        self.areas += np.bincount(index.ravel(), minlength=self.size)
        for position, found in enumerate(ndimage.find_objects(index)):  # every box of the band in one pass
            if found is not None:
                rows, cols = found
                found = [left + cols.start, top + rows.start, left + cols.stop, top + rows.stop]
                box = self.boxes.setdefault(position + 1, found)
                box[:] = [min(box[0], found[0]), min(box[1], found[1]), max(box[2], found[2]), max(box[3], found[3])]
        return index

    def box(self, segment_id: int) -> list[int] | None:
        """`[left, top, right, bottom]` of segment `segment_id` (>= 0) in the bands added; None if it has no pixel."""
        return self.boxes.get(segment_id + 1)


def _interior_point(ids: np.ndarray, segment_id: int, box: list[int] | None) -> tuple[int, int] | None:
    """(x, y) of the pixel of segment `segment_id` farthest from its border, computed on its bounding `box` only
    (`[left, top, right, bottom]`; None: the segment has no pixel), and on every s-th row and column of it if it has
    more than `LABEL_PIXELS` pixels (the distance transform takes 16 bytes per pixel)."""
    if box is None:
        return None
    left, top, right, bottom = box
    stride = max(1, math.ceil(math.sqrt((bottom - top) * (right - left) / LABEL_PIXELS)))
    mask = ids[top:bottom:stride, left:right:stride] == segment_id
    if not mask.any():  # a thin segment between the sampled rows and columns: any of its pixels
        y, x = top, left + int(np.argmax(ids[top, left:right] == segment_id))
        return int(x), int(y)
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(distance.argmax(), distance.shape)
    return int(left + x * stride), int(top + y * stride)


def _legend(draw: ImageDraw.ImageDraw, segments, area: np.ndarray, id2label, font) -> None:
    """The classes present, largest `area` (pixels per segment id) first."""
    by_label: dict[int, int] = {}
    for segment in segments:
        segment_id, label = int(segment["id"]), int(segment["label_id"])
        by_label[label] = by_label.get(label, 0) + (int(area[segment_id]) if segment_id < area.size else 0)
    labels = sorted(by_label, key=lambda label: -by_label[label])
    if not labels:
        return
    lines = labels[:MAX_LEGEND_ENTRIES]
    texts = [_name(label, id2label) for label in lines]
    if len(labels) > len(lines):
        texts.append(f"+{len(labels) - len(lines)} more")
    line_height = _text_size(draw, "Ag", font)[1] + 4
    swatch = line_height - 4
    width = max(_text_size(draw, t, font)[0] for t in texts) + swatch + 12
    draw.rectangle([2, 2, 2 + width, 2 + line_height * len(texts) + 4], fill=(0, 0, 0))
    for row, text in enumerate(texts):
        y = 5 + row * line_height
        if row < len(lines):
            draw.rectangle([6, y, 6 + swatch, y + swatch], fill=label_colour(lines[row]), outline=(255, 255, 255))
        draw.text((10 + swatch, y), text, fill=(255, 255, 255), font=font)


def _text_box(draw: ImageDraw.ImageDraw, point, text: str, font, anchor: str) -> None:
    left, top, right, bottom = draw.textbbox(point, text, font=font, anchor=anchor)
    draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=(0, 0, 0))
    draw.text(point, text, fill=(255, 255, 255), font=font, anchor=anchor)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _name(label: int, id2label) -> str:
    return str(id2label.get(label, id2label.get(str(label), label)))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()
