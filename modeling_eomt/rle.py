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
    """COCO compressed RLE (`pycocotools.mask.encode(...)["counts"]`) of a binary `(height, width)` mask."""
    return encode_segment_rles([np.asarray(mask, dtype=np.int64)], [1])[1]


def encode_segment_rles(bands: Iterable[np.ndarray], segment_ids: Iterable[int]) -> dict[int, str]:
    """[`encode_rle`] of the mask of each id of `segment_ids` in a map of segment ids given as `bands` `(height,
    columns)` side by side, left to right, in one pass over the map: runs go down the columns, and a run of a segment's
    mask starts or ends exactly where the id changes to or from it. One band at a time is enough; what is kept is the
    change positions, about the size of the RLEs themselves."""
    wanted = np.unique(np.fromiter(segment_ids, dtype=np.int64))
    positions, keys = [], []  # per band: each change position, for the id it enters and for the id it leaves
    offset, previous = 0, _NOTHING
    for band in bands:
        flat = np.asarray(band).ravel(order="F").astype(np.int64, copy=False)
        if not flat.size:
            continue
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        before = flat[change - 1]
        if flat[0] != previous:
            change, before = np.concatenate([[0], change]), np.concatenate([[previous], before])
        for ids in (flat[change], before):
            keep = np.isin(ids, wanted)
            positions.append(change[keep] + offset)
            keys.append(ids[keep])
        offset, previous = offset + flat.size, flat[-1]
    positions = np.concatenate([np.zeros(0, np.int64), *positions])
    keys = np.concatenate([np.zeros(0, np.int64), *keys])
    order = np.lexsort((positions, keys))
    positions, keys = positions[order], keys[order]
    rles = {}
    for segment_id in wanted.tolist():
        start, stop = np.searchsorted(keys, segment_id, "left"), np.searchsorted(keys, segment_id, "right")
        runs = np.diff(np.concatenate([[0], positions[start:stop], [offset]]))  # background first
        rles[segment_id] = _compress(runs.tolist())
    return rles


def _compress(counts: list[int]) -> str:
    """COCO's string form of run lengths `counts`."""
    chars = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        while True:
            digit = value & 0x1F
            value >>= 5
            more = value != -1 if digit & 0x10 else value != 0
            chars.append(chr(digit + 48 + (0x20 if more else 0)))
            if not more:
                break
    return "".join(chars)


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
