"""COCO RLE: our encoder and decoder against pycocotools."""

import tracemalloc

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


def test_one_pass_rles_keep_a_band_and_the_strings_not_the_whole_map():
    # Noise: the id changes at almost every pixel, so the change positions of the whole map would be 16 bytes a pixel
    # (73 MB here, measured before the band-by-band encoding).
    ids = np.random.default_rng(0).integers(0, 20, (1000, 1000))
    band_bytes = ids[:, :50].nbytes
    tracemalloc.start()
    try:
        rles = encode_segment_rles((ids[:, start : start + 50] for start in range(0, 1000, 50)), range(20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * sum(map(len, rles.values())) + 20 * band_bytes
    mask = np.asfortranarray((ids == 3).astype(np.uint8))
    assert rles[3] == coco_mask.encode(mask)["counts"].decode()


def test_encode_rle_takes_any_nonzero_value_as_foreground():
    mask = np.zeros((6, 5), dtype=np.uint8)
    mask[1:4, 2:] = 255
    expected = coco_mask.encode(np.asfortranarray((mask > 0).astype(np.uint8)))["counts"].decode()
    assert encode_rle(mask) == encode_rle(mask * 0.7) == expected
