"""COCO RLE: our encoder and decoder against pycocotools."""

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from modeling_eomt.rle import encode_rle, encode_segment_rles, rle_to_mask


def test_rle_decoding_matches_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(20):
        height, width = rng.integers(1, 40, 2)
        mask = rng.random((height, width)) < rng.uniform(0.05, 0.95)
        if trial == 0:
            mask[:] = True
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        for counts in (encoded["counts"], encoded["counts"].decode()):
            assert np.array_equal(rle_to_mask({"size": encoded["size"], "counts": counts}), mask)
        # Uncompressed RLE (iscrowd annotations in COCO JSON): runs in column-major order, zeros first.
        flat = mask.T.ravel()
        change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
        runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
        runs = ([0] + runs) if flat[0] else runs
        assert np.array_equal(rle_to_mask({"size": [height, width], "counts": runs}), mask)
        oracle = coco_mask.decode(coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width))
        assert np.array_equal(oracle.astype(bool), mask)
    with pytest.raises(ValueError, match="corrupt"):
        rle_to_mask({"size": [4, 4], "counts": [3, 4]})


def test_encode_then_decode_round_trips_and_pycocotools_agrees():
    rng = np.random.default_rng(1)
    for height, width in ((1, 1), (3, 5), (17, 9), (40, 33)):
        for mask in (
            rng.random((height, width)) < 0.5,
            np.ones((height, width), bool),
            np.zeros((height, width), bool),
        ):
            counts = encode_rle(mask)
            assert counts == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
            assert np.array_equal(rle_to_mask({"size": [height, width], "counts": counts}), mask)


@pytest.mark.parametrize("band_columns", [1, 3, 33])
def test_one_pass_rles_of_every_segment_of_an_id_map_are_pycocotools(band_columns):
    # Segments touching the first pixel, the last, every border, void (-1) between them; an id that is absent.
    rng = np.random.default_rng(2)
    ids = rng.integers(-1, 4, (21, 33)).repeat(2, 0)[:40]
    ids[:5, :7], ids[-1, -1] = 7, 9
    bands = [ids[:, start : start + band_columns] for start in range(0, ids.shape[1], band_columns)]
    rles = encode_segment_rles(bands, [0, 1, 2, 3, 7, 9, 12])
    for segment_id, counts in rles.items():
        mask = np.asfortranarray((ids == segment_id).astype(np.uint8))
        assert counts == coco_mask.encode(mask)["counts"].decode(), segment_id
    assert sorted(rles) == [0, 1, 2, 3, 7, 9, 12]
