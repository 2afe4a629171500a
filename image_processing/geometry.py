"""Where model inputs lie in their images: preprocessing cuts them with it, post-processing puts them back with it.

A model input is either a whole resized image or (semantic checkpoints) a square window sliding along its long side,
zero-padded bottom/right to its canvas. `patch_offsets` (`[image_index, start, end]` along the long side) name the
windows between the two; everything else follows from the resized sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """Where one model input lies in its resized image: `canvas[:height, :width]` (the model input, padded to
    `canvas`) covers rows `top:top + height` and columns `left:left + width` of resized image `image_index`."""

    image_index: int
    top: int
    left: int
    height: int
    width: int
    canvas: tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """The geometry of a batch: one `Placement` per model input, and per image its resized and target size."""

    placements: tuple[Placement, ...]
    resized_sizes: tuple[tuple[int, int], ...]
    target_sizes: tuple[tuple[int, int], ...]

    def inputs_of(self, image_index: int) -> list[int]:
        """Indices of the model inputs showing image `image_index`."""
        return [n for n, placement in enumerate(self.placements) if placement.image_index == image_index]


def window_offsets(resized_sizes: Sequence[tuple[int, int]], crop: int | None) -> list[tuple[int, int, int]]:
    """`(image_index, start, end)` along the long side of each model input: with `crop`, ceil(long / crop) windows of
    `crop` pixels overlapping evenly (the original release's rule, offsets truncated like the Hub processors');
    without, the whole image."""
    offsets = []
    for index, (height, width) in enumerate(resized_sizes):
        long_side = max(height, width)
        if crop is None:
            offsets.append((index, 0, long_side))
            continue
        count = math.ceil(long_side / crop)
        step = crop - ((count * crop - long_side) / (count - 1) if count > 1 else 0)
        offsets += [(index, int(i * step), int(i * step) + crop) for i in range(count)]
    return offsets


def layout(
    target_sizes: Sequence[tuple[int, int]],
    resized_sizes: Sequence[tuple[int, int]],
    offsets: Iterable[tuple[int, int, int]],
    pad_to: tuple[int, int] | None,
) -> Layout:
    """The `Layout` of model inputs cut at `offsets` (see `window_offsets`) from images resized to `resized_sizes`,
    each padded to at least `pad_to` (`None`: not padded)."""
    placements = []
    for index, start, end in offsets:
        height, width = resized_sizes[index]
        if height > width:  # windows slide along the long side
            top, left, height = start, 0, min(end, height) - start
        else:
            top, left, width = 0, start, min(end, width) - start
        canvas = (max(height, pad_to[0]), max(width, pad_to[1])) if pad_to else (height, width)
        placements.append(Placement(index, top, left, height, width, canvas))
    return Layout(tuple(placements), tuple(map(tuple, resized_sizes)), tuple(map(tuple, target_sizes)))
