"""COCO run-length encoding of binary masks, the form `pycocotools.mask` reads and writes: the CLI writes it into its
JSON, the training datasets read it from COCO annotations.

A mask is flattened column-major (Fortran order) into runs of alternating background and foreground, background
first. Compressed `counts` strings store each run in 5-bit groups offset by 48 (bit 0x20: more groups follow, bit
0x10 of the last group: negative); from the third run on, a run is stored as its difference to the run two places
before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# The id "before" a map's first pixel: no segment's.
_NOTHING = np.iinfo(np.int64).min


def encode_rle(mask: np.ndarray) -> str:
    """COCO compressed RLE (`pycocotools.mask.encode(...)["counts"]`) of a binary `(height, width)` mask (nonzero:
    foreground)."""
    return encode_segment_rles([(np.asarray(mask) != 0).astype(np.int64)], [1])[1]


def encode_segment_rles(bands: Iterable[np.ndarray], segment_ids: Iterable[int]) -> dict[int, str]:
    """[`encode_rle`] of the mask of each id of `segment_ids` in a map of segment ids given as `bands` `(height,
    columns)` side by side, left to right, in one pass over the map: runs go down the columns, and a run of a segment's
    mask starts or ends exactly where the id changes to or from it. One band at a time is enough: each band's changes
    become runs and compressed text at once, so memory stays at a band plus the RLE strings."""
    encoders = {segment_id: _RunEncoder() for segment_id in segment_ids}
    wanted = np.fromiter(encoders, dtype=np.int64)
    offset, previous = 0, _NOTHING
    for band in bands:
        flat = np.asarray(band).ravel(order="F").astype(np.int64, copy=False)
        if not flat.size:
            continue
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        before = flat[change - 1]
        if flat[0] != previous:
            change, before = np.concatenate([[0], change]), np.concatenate([[previous], before])
        # Each change flips the mask of the id it leaves and of the id it enters.
        keys, positions = np.concatenate([before, flat[change]]), np.concatenate([change, change]) + offset
        keep = np.isin(keys, wanted)
        keys, positions = keys[keep], positions[keep]
        order = np.lexsort((positions, keys))
        keys, positions = keys[order], positions[order]
        starts = np.flatnonzero(np.diff(keys, prepend=_NOTHING))
        for start, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(keys)]):
            encoders[int(keys[start])].flip_at(positions[start:stop])
        offset, previous = offset + flat.size, flat[-1]
    return {segment_id: encoder.finish(offset) for segment_id, encoder in encoders.items()}


class _RunEncoder:
    """COCO's compressed string of a mask's runs (background first), fed the positions where the mask flips, in
    order: each run is packed as soon as it ends, in 5-bit groups offset by 48 (bit 0x20: more groups follow, bit 0x10
    of the last group: negative); from the third run on, as its difference to the run two places before."""

    def __init__(self) -> None:
        self.chars = bytearray()
        self.flipped = 0  # where the current run started
        self.runs = 0  # how many runs are packed
        self.last_two = [0, 0]  # the last two runs packed, the older first

    def flip_at(self, positions: np.ndarray) -> None:
        for run in np.diff(positions, prepend=self.flipped).tolist():
            self._pack(run)
        self.flipped = int(positions[-1])

    def finish(self, size: int) -> str:
        self._pack(size - self.flipped)
        return self.chars.decode()

    def _pack(self, run: int) -> None:
        value = run - self.last_two[0] if self.runs > 2 else run
        self.runs += 1
        self.last_two = [self.last_two[1], run]
        while True:
            digit = value & 0x1F
            value >>= 5
            more = value != -1 if digit & 0x10 else value != 0
            self.chars.append(digit + 48 + (0x20 if more else 0))
            if not more:
                break


def decode_rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE `counts` string (the inverse of [`encode_rle`]'s packing)."""
    data = counts.encode() if isinstance(counts, str) else counts
    runs: list[int] = []
    position = 0
    while position < len(data):
        value, shift = 0, 0
        while True:
            chunk = data[position] - 48
            position += 1
            value |= (chunk & 0x1F) << shift
            shift += 5
            if not chunk & 0x20:
                if chunk & 0x10:
                    value -= 1 << shift
                break
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """bool [H, W] from a COCO RLE (`{"size": [H, W], "counts": str | list[int]}`; compressed or not)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = decode_rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels but its size is {height}x{width}; the RLE is corrupt.")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(width, height).T.copy()
