"""`shapes`: a synthetic panoptic set for demos and tests.

Every image shows two or three textured *stuff* bands (sky, grass, wall) with wavy borders and one to four
outlined *things* (circles, squares, triangles) on top, possibly overlapping. Each class has its own colour
family and each thing a dark outline, so a small EoMT learns the set from scratch in a few CPU minutes.
An example depends only on `(seed, index, image_size)`: the set has any length and any size without storage.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from .dataset import SegmentationDataset

SHAPES_ID2LABEL = {0: "circle", 1: "square", 2: "triangle", 3: "sky", 4: "grass", 5: "wall"}
SHAPES_STUFF_IDS = (3, 4, 5)

# (low, high) RGB bounds per thing class: far apart from each other and from the stuff textures below.
_THING_COLOURS = {
    0: ((200, 20, 20), (255, 70, 60)),
    1: ((20, 30, 150), (60, 70, 220)),
    2: ((220, 200, 0), (255, 240, 60)),
}
# A thing must keep this share of its area visible, both when drawn and after later things cover it.
_MIN_VISIBLE = 0.6


def _stuff_texture(label: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Float RGB texture [H, W, 3] of one stuff class."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if label == 3:  # sky: light blue, brighter towards the bottom, faint noise
        base = np.array([120, 175, 235], np.float32) + rng.uniform(-15, 15, 3)
        image = base + 30 * (yy / height)[..., None] + rng.normal(0, 4, (height, width, 1))
    elif label == 4:  # grass: green with strong vertical streaks
        base = np.array([60, 145, 50], np.float32) + rng.uniform(-15, 15, 3)
        streaks = rng.normal(0, 18, (1, width, 1))
        image = base + streaks + rng.normal(0, 10, (height, width, 1))
    else:  # wall: beige bricks with dark mortar lines
        base = np.array([170, 150, 125], np.float32) + rng.uniform(-15, 15, 3)
        brick = max(4, round(min(height, width) / 10))
        row = (yy // brick).astype(int)
        shifted = xx + (row % 2) * brick
        mortar = (yy % brick < 1) | (shifted % (2 * brick) < 1)
        image = base + rng.normal(0, 6, (height, width, 1)) - 70 * mortar[..., None]
    return image


def _thing_mask(
    label: int, centre: np.ndarray, radius: float, angle: float, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Boolean mask of a circle, rotated square or rotated triangle, tested at pixel centres."""
    if label == 0:
        return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    corners = 4 if label == 1 else 3
    angles = angle + 2 * np.pi * np.arange(corners) / corners
    vertices = centre + radius * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    inside = np.ones_like(yy, dtype=bool)
    # Convex polygon with vertices in counter-clockwise order (in x-right, y-down coordinates): inside every edge.
    for (y0, x0), (y1, x1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def render_shapes_example(
    index: int, seed: int = 0, image_size: int | tuple[int, int] = 128
) -> dict[str, torch.Tensor]:
    """
    Draw example `index` of the shapes set with the given `seed`.

    Returns:
        `dict` with `image` (uint8 [3, H, W]), `masks` (bool [N, H, W], things first, then one per stuff class),
        `class_labels` (int64 [N], see `SHAPES_ID2LABEL`) and `is_crowd` (bool [N], all false).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5

    # Stuff: 2-3 classes as horizontal bands, borders wavy, each band at least a fifth of the height.
    stuff = rng.permutation(SHAPES_STUFF_IDS)[: rng.integers(2, 4)]
    cuts = np.sort(rng.uniform(0.2, 0.8, len(stuff) - 1))
    while len(cuts) > 1 and cuts[1] - cuts[0] < 0.2:
        cuts = np.sort(rng.uniform(0.2, 0.8, len(stuff) - 1))
    band = np.zeros((height, width), dtype=np.int64)
    for cut in cuts:
        wave = cut * height + rng.uniform(0.02, 0.06) * height * np.sin(
            2 * np.pi * xx / (width * rng.uniform(0.4, 1.0)) + rng.uniform(0, 2 * np.pi)
        )
        band += yy >= wave
    image = np.zeros((height, width, 3), np.float32)
    for position, label in enumerate(stuff):
        region = band == position
        image[region] = _stuff_texture(int(label), height, width, rng)[region]

    # Things: placed one after another, rejecting placements that hide too much of what is already there.
    side = min(height, width)
    owner = np.full((height, width), -1, dtype=np.int64)
    things: list[tuple[int, int]] = []  # (label, full area)
    for _ in range(rng.integers(1, 5)):
        for _attempt in range(20):
            label = int(rng.integers(0, 3))
            radius = rng.uniform(0.12, 0.22) * side
            centre = rng.uniform([radius * 0.5, radius * 0.5], [height - radius * 0.5, width - radius * 0.5])
            mask = _thing_mask(label, centre, radius, rng.uniform(0, 2 * np.pi), yy, xx)
            area = int(mask.sum())
            covered_ok = all(((owner == k) & ~mask).sum() >= _MIN_VISIBLE * full for k, (_, full) in enumerate(things))
            if area > 0 and covered_ok:
                break
        else:
            continue
        low, high = _THING_COLOURS[label]
        colour = rng.uniform(low, high).astype(np.float32)
        # Darker rim one to two pixels wide so that touching instances of one class stay separable.
        rim = mask & ~_erode(mask, max(1, round(side / 64)))
        image[mask] = colour + rng.normal(0, 5, (int(mask.sum()), 1))
        image[rim] = colour * 0.35
        owner[mask] = len(things)
        things.append((label, area))

    masks = [owner == k for k in range(len(things))] + [(band == p) & (owner < 0) for p in range(len(stuff))]
    labels = [label for label, _ in things] + [int(label) for label in stuff]
    keep = [k for k, mask in enumerate(masks) if mask.any()]
    return {
        "image": torch.from_numpy(np.clip(image, 0, 255).round().astype(np.uint8)).permute(2, 0, 1).contiguous(),
        "masks": torch.from_numpy(np.stack([masks[k] for k in keep])),
        "class_labels": torch.tensor([labels[k] for k in keep], dtype=torch.int64),
        "is_crowd": torch.zeros(len(keep), dtype=torch.bool),
    }


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion with a 3x3 cross, `steps` times (pixels outside the image count as background)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask


def shapes_dataset(
    num_examples: int = 2000, image_size: int | tuple[int, int] = 128, seed: int = 0, task: str = "panoptic"
) -> SegmentationDataset:
    """The shapes set as a [`SegmentationDataset`]; use different seeds for training and held-out splits."""
    return SegmentationDataset(
        range(num_examples),
        partial(render_shapes_example, seed=seed, image_size=image_size),
        source_task="panoptic",
        task=task,
        id2label=SHAPES_ID2LABEL,
        stuff_ids=SHAPES_STUFF_IDS,
    )
