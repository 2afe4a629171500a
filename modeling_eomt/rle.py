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


def encode_rle(mask: np.ndarray) -> str:
    """COCO compressed RLE (`pycocotools.mask.encode(...)["counts"]`) of a binary `(height, width)` mask."""
    return encode_rle_columns([mask])


def encode_rle_columns(bands: Iterable[np.ndarray]) -> str:
    """[`encode_rle`] of the mask made of `bands` `(height, columns)` side by side, left to right: runs go down the
    columns, so one band at a time is enough (a full-size mask of a 10000×10000 image would take 100 MB, and its
    flattening as much again)."""
    counts, value, run = [], False, 0  # runs start with background
    for band in bands:
        flat = np.asarray(band, dtype=bool).ravel(order="F")
        if not flat.size:
            continue
        if flat[0] != value:
            counts.append(run)
            run = 0
        lengths = np.diff(np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])).tolist()
        run += lengths[0]
        for length in lengths[1:]:
            counts.append(run)
            run = length
        value = bool(flat[-1])
    counts.append(run)
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
