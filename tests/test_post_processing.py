"""Post-processing: parity with transformers' built-in EoMT processor (the oracle) on the same model outputs, the fast
semantic path and the banded panoptic and instance paths against the plain ones, chunking, top-k instances,
sliding-window outputs, runtime (numpy) outputs, `post_process(task)` and argument checks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from modeling_eomt.configuration import TASKS
from modeling_eomt.image_processing import Layout, Placement, post_processing, segments_fast, semantic_fast
from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil as BuiltinProcessor

from modeling_eomt import EomtImageProcessor

PANOPTIC_SIZE = {"shortest_edge": 64, "longest_edge": 64}
SEMANTIC_SIZE = {"shortest_edge": 32, "longest_edge": None}
TARGET_SIZES = [(48, 80), (90, 40)]  # both padded to the square canvas


def fake_outputs(batch: int, queries: int = 24, classes: int = 6, grid: int = 16, confident: int = 10, seed: int = 0):
    """Outputs where `confident` queries predict one class clearly and a blob of mask, the rest noise."""
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    mask_logits = torch.randn(batch, queries, grid, grid, generator=g) * 2 - 3
    for b in range(batch):
        for q in range(confident):
            class_logits[b, q, q % classes] += 6 + 4 * torch.rand((), generator=g)
            top, left = torch.randint(0, grid - 4, (2,), generator=g).tolist()
            height, width = torch.randint(3, grid // 2, (2,), generator=g).tolist()
            mask_logits[b, q, top : top + height, left : left + width] += 8
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits, patch_offsets=None)


def assert_same_segments(ours: list[dict], reference: list[dict]) -> None:
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference):
        assert mine["segments_info"] == theirs["segments_info"]
        assert torch.equal(mine["segmentation"], theirs["segmentation"].long())


def assert_labels_match(labels: torch.Tensor, oracle_scores: torch.Tensor) -> None:
    """Labels equal the oracle's argmax, except where its two best class scores are within 1e-5 of each other: our
    post-processing sums the same linear terms (bilinear weights, window averages, the class contraction) in another
    order, which changes float32 rounding by ~1e-7 and can only flip such near ties, and those must be rare."""
    top2 = oracle_scores.topk(2, dim=0).values
    differ = labels != oracle_scores.argmax(0)
    assert bool(((top2[0] - top2[1])[differ] <= 1e-5).all())
    assert int(differ.sum()) <= max(1, differ.numel() // 1000)


@pytest.fixture
def processors():
    return EomtImageProcessor(size=PANOPTIC_SIZE), BuiltinProcessor(size=PANOPTIC_SIZE, do_pad=True)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"threshold": 0.5, "stuff_classes": [0, 1, 2]},
        {"threshold": 0.9, "overlap_mask_area_threshold": 0.5},
        {"mask_threshold": 0.3},
        {"threshold": 0.6, "mask_threshold": 0.7},
    ],
)
@pytest.mark.parametrize("target_sizes", [TARGET_SIZES, [(20, 30), (150, 70)]])  # up- and downscaled canvases
def test_panoptic_matches_builtin(processors, options, target_sizes):
    ours, builtin = processors
    outputs = fake_outputs(2)
    if "stuff_classes" in options:  # any form of class ids
        tensor = {**options, "stuff_classes": torch.tensor(options["stuff_classes"])}
        assert_same_segments(
            ours.post_process_panoptic_segmentation(outputs, target_sizes, **tensor),
            ours.post_process_panoptic_segmentation(outputs, target_sizes, **options),
        )
    result = ours.post_process_panoptic_segmentation(outputs, target_sizes, **options)
    assert_same_segments(result, builtin.post_process_panoptic_segmentation(outputs, target_sizes, **options))
    assert sum(len(r["segments_info"]) for r in result) >= 3  # the comparison covered real segments


def test_panoptic_fuses_stuff_segments(processors):
    ours, _ = processors
    outputs = fake_outputs(1, seed=3)
    separate = ours.post_process_panoptic_segmentation(outputs, TARGET_SIZES[:1], threshold=0.5)[0]
    labels = [s["label_id"] for s in separate["segments_info"]]
    repeated = {label for label in labels if labels.count(label) > 1}
    assert repeated, "fixture should repeat a class"
    fused = ours.post_process_panoptic_segmentation(
        outputs, TARGET_SIZES[:1], threshold=0.5, stuff_classes=sorted(repeated)
    )[0]
    fused_labels = [s["label_id"] for s in fused["segments_info"]]
    assert all(fused_labels.count(label) == 1 for label in repeated)
    # fusing only relabels: the same pixels stay covered
    assert torch.equal(fused["segmentation"] >= 0, separate["segmentation"] >= 0)


@pytest.mark.parametrize("threshold", [0.8, 0.3, 0.0])
@pytest.mark.parametrize("target_sizes", [TARGET_SIZES, [(20, 30), (150, 70)]])
def test_instance_matches_builtin(processors, threshold, target_sizes):
    ours, builtin = processors
    outputs = fake_outputs(2, seed=1)
    result = ours.post_process_instance_segmentation(outputs, target_sizes, threshold=threshold, mask_threshold=0.5)
    assert_same_segments(
        result, builtin.post_process_instance_segmentation(outputs, target_sizes, threshold=threshold)
    )
    assert sum(len(r["segments_info"]) for r in result) >= 2


def test_instance_mask_threshold_by_hand(processors):
    """The built-in has no `mask_threshold` for instances (it cuts at 0.5): checked by hand at 0.3 and 0.7."""
    ours, _ = processors
    outputs = fake_outputs(1, seed=8)
    placement = ours.layout(TARGET_SIZES[:1]).placements[0]
    probs = outputs.class_queries_logits[0].softmax(-1)[:, :-1]
    masks = post_processing.upsample_masks(outputs.masks_queries_logits[0], placement, TARGET_SIZES[0]).sigmoid()
    for mask_threshold in (0.3, 0.7):
        result = ours.post_process_instance_segmentation(
            outputs, TARGET_SIZES[:1], threshold=0.5, mask_threshold=mask_threshold, return_binary_maps=True
        )[0]
        expected = []
        for query in range(probs.shape[0]):
            score, label = probs[query].max(0)
            inside = masks[query] > mask_threshold
            score = float(score * masks[query][inside].sum() / (inside.sum() + 1e-6))
            if inside.any() and score >= 0.5:
                expected.append((int(label), score, inside))
        assert len(result["segments_info"]) == len(expected) >= 3
        for segment, binary, (label, score, inside) in zip(result["segments_info"], result["segmentation"], expected):
            assert segment["label_id"] == label and segment["score"] == pytest.approx(score, abs=2e-6)
            assert torch.equal(binary, inside)


def test_semantic_matches_builtin_on_square_images(processors):
    ours, builtin = processors
    outputs = fake_outputs(2, seed=2)
    sizes = [(64, 64), (100, 100)]
    result = ours.post_process_semantic_segmentation(outputs, sizes, return_segmentation_scores=True)
    reference = builtin.post_process_semantic_segmentation(outputs, sizes, return_segmentation_scores=True)
    for mine, theirs in zip(result, reference):
        torch.testing.assert_close(mine.segmentation_scores, theirs.segmentation_scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(mine.segmentation, theirs.segmentation)
    plain = ours.post_process_semantic_segmentation(outputs, sizes)
    assert all(torch.equal(p, r.segmentation) for p, r in zip(plain, result))


def test_semantic_sliding_windows_match_builtin():
    ours = EomtImageProcessor(size=SEMANTIC_SIZE, do_split_image=True, do_pad=False)
    builtin = BuiltinProcessor(size=SEMANTIC_SIZE, do_split_image=True)
    images = [
        torch.randint(0, 256, (3, 40, 90), dtype=torch.uint8),
        torch.randint(0, 256, (3, 70, 33), dtype=torch.uint8),
    ]
    offsets = builtin(images=images, return_tensors="pt")["patch_offsets"]
    assert [o.tolist() for o in ours(images)["patch_offsets"]] == [o.tolist() for o in offsets]
    outputs = fake_outputs(len(offsets), grid=8, seed=4)
    outputs.patch_offsets = offsets
    sizes = [tuple(i.shape[-2:]) for i in images]
    result = ours.post_process_semantic_segmentation(outputs, sizes, return_segmentation_scores=True)
    reference = builtin.post_process_semantic_segmentation(outputs, sizes, return_segmentation_scores=True)
    labels = ours.post_process_semantic_segmentation(outputs, sizes)
    for mine, theirs, plain in zip(result, reference, labels):
        torch.testing.assert_close(mine.segmentation_scores, theirs.segmentation_scores, rtol=1e-5, atol=1e-6)
        assert_labels_match(mine.segmentation, theirs.segmentation_scores)
        assert_labels_match(plain, theirs.segmentation_scores)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("band_elements", [1, 2**21])
def test_fast_semantic_matches_plain_and_builtin(fraction, band_elements):
    """The fast semantic path (`semantic_fast`, what the processor runs) against the plain one and the built-in:
    overlapping windows along either side and padded squares, at the resized size and resized up or down. Candidate
    fractions from all classes (nothing pruned) to only the best (most pixels re-checked) and one-row bands must not
    change a label, a score or a segment."""
    ours = EomtImageProcessor(size=SEMANTIC_SIZE, do_split_image=True, do_pad=False)
    builtin = BuiltinProcessor(size=SEMANTIC_SIZE, do_split_image=True)
    # windows of 32 overlap along the long side; short side 32: resized = original size, else resized up or down
    sizes = [(32, 90), (75, 32), (40, 90), (24, 50)]
    images = [torch.randint(0, 256, (3, *size), dtype=torch.uint8) for size in sizes]
    offsets = builtin(images=images, return_tensors="pt")["patch_offsets"]
    assert len(offsets) == 12
    windows = fake_outputs(len(offsets), classes=12, grid=8, seed=8)
    squares = fake_outputs(2, classes=12, seed=9)
    cases = [
        (windows, sizes, ours.layout(sizes, offsets), builtin),
        (squares, [(64, 64), (100, 100)], EomtImageProcessor(size=PANOPTIC_SIZE).layout([(64, 64), (100, 100)]),
         BuiltinProcessor(size=PANOPTIC_SIZE, do_pad=True)),
    ]  # fmt: skip
    tuning = {"band_elements": band_elements, "candidate_fraction": fraction}
    for outputs, target_sizes, layout, oracle in cases:
        logits = outputs.class_queries_logits, outputs.masks_queries_logits
        outputs.patch_offsets = offsets if oracle is builtin else None
        reference = oracle.post_process_semantic_segmentation(outputs, target_sizes, return_segmentation_scores=True)
        plain = post_processing.semantic_segmentation(*logits, layout, return_segmentation_scores=True)
        fast = semantic_fast.semantic_segmentation(*logits, layout, **tuning)
        fast_scores = semantic_fast.semantic_segmentation(*logits, layout, return_segmentation_scores=True, **tuning)
        for labels, scores, expected, theirs in zip(fast, fast_scores, plain, reference):
            torch.testing.assert_close(expected.segmentation_scores, theirs.segmentation_scores, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(scores.segmentation_scores, expected.segmentation_scores, rtol=1e-5, atol=1e-6)
            assert_labels_match(labels, expected.segmentation_scores)
            assert_labels_match(expected.segmentation, theirs.segmentation_scores)
        plain_segments = post_processing.semantic_segments(*logits, layout)
        for mine, expected in zip(semantic_fast.semantic_segments(*logits, layout, **tuning), plain_segments):
            assert [s["label_id"] for s in mine["segments_info"]] == [s["label_id"] for s in expected["segments_info"]]
            scores = [s["score"] for s in mine["segments_info"]]
            assert scores == pytest.approx([s["score"] for s in expected["segments_info"]], abs=1e-5)
            assert (mine["segmentation"] != expected["segmentation"]).float().mean() <= 1e-3


@pytest.mark.parametrize("target", [(8, 8), (12, 10)])
def test_semantic_label_pruning_survives_float32_underflow(target):
    # Query 0 gives class 0 probability ~1 but its mask is -80 everywhere (sigmoid 2e-35); query 1 covers everything
    # but gives class 2 only 1e-24, whose square underflows in float32. Class 2 scores 1e-24 vs 2e-35: it must win,
    # though a float32 bound would have ruled it out.
    class_logits = torch.full((1, 2, 4), -100.0)
    class_logits[0, 0, 0] = class_logits[0, 1, 3] = 0.0
    class_logits[0, 1, 2] = -55.0
    mask_logits = torch.stack([torch.full((2, 2), -80.0), torch.full((2, 2), 10.0)])[None]
    layout = Layout((Placement(0, 0, 0, 8, 8, (8, 8)),), ((8, 8),), (target,))
    for fraction in (0.1, 1.0):
        (labels,) = semantic_fast.semantic_segmentation(class_logits, mask_logits, layout, candidate_fraction=fraction)
        assert labels.shape == target and (labels == 2).all()
    (plain,) = post_processing.semantic_segmentation(class_logits, mask_logits, layout)
    assert (plain == 2).all()


def test_interpolation_weights_match_interpolate():
    for size_in, size_out, stop in [(16, 64, 64), (16, 64, 40), (10, 25, 25), (7, 3, 3), (5, 5, 5)]:
        values = torch.randn(2, size_in, generator=torch.Generator().manual_seed(size_out))
        expected = F.interpolate(values[None], size=size_out, mode="linear", align_corners=False)[0, :, :stop]
        weights = semantic_fast._interpolation_weights(size_in, size_out, stop)
        torch.testing.assert_close(values @ weights.T, expected, rtol=1e-6, atol=1e-6)
        assert bool((weights >= 0).all()) and torch.allclose(weights.sum(1), torch.ones(stop))


def test_semantic_padding_matches_builtin_canvas():
    """A padded non-square image: scores and labels equal the oracle's on the padded canvas, padding cropped (the
    built-in resizes the padded canvas to the image size instead, see `test_semantic_crops_padding`)."""
    ours = EomtImageProcessor(size=PANOPTIC_SIZE)
    outputs = fake_outputs(1, classes=12, seed=10)
    canvas = BuiltinProcessor(size=PANOPTIC_SIZE, do_pad=True).post_process_semantic_segmentation(
        outputs, [(64, 64)], return_segmentation_scores=True
    )[0]
    expected = canvas.segmentation_scores[:, :32]  # a 32×64 image fills the top half of the 64×64 canvas
    result = ours.post_process_semantic_segmentation(outputs, [(32, 64)], return_segmentation_scores=True)[0]
    torch.testing.assert_close(result.segmentation_scores, expected, rtol=1e-5, atol=1e-6)
    assert_labels_match(result.segmentation, expected)
    assert_labels_match(ours.post_process_semantic_segmentation(outputs, [(32, 64)])[0], expected)


def test_semantic_crops_padding():
    """A padded non-square image: the padded band must not be stretched into the result."""
    ours = EomtImageProcessor(size=PANOPTIC_SIZE)
    outputs = fake_outputs(1, queries=2, classes=2, confident=0)
    outputs.class_queries_logits[:] = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    outputs.masks_queries_logits[:] = -10.0
    outputs.masks_queries_logits[0, 0, :8] = 10.0  # class 0 in the top half of the canvas = the whole 32×64 image
    outputs.masks_queries_logits[0, 1, 8:] = 10.0  # class 1 only in the padding
    segmentation = ours.post_process_semantic_segmentation(outputs, [(30, 60)])[0]
    assert segmentation.shape == (30, 60) and bool((segmentation == 0).all())


def test_chunked_results_equal(processors):
    """Panoptic and instance post-processing upsample a bounded number of queries at a time: any chunk size gives the
    same segments."""
    ours, _ = processors
    outputs = fake_outputs(2, seed=5)
    logits, layout = (outputs.class_queries_logits, outputs.masks_queries_logits), ours.layout(TARGET_SIZES)
    for function in (post_processing.panoptic_segmentation, post_processing.instance_segmentation):
        expected = function(*logits, layout, threshold=0.5)
        assert sum(len(r["segments_info"]) for r in expected) >= 3
        for chunk_elements in (1, 3 * 90 * 40):
            for mine, theirs in zip(function(*logits, layout, threshold=0.5, chunk_elements=chunk_elements), expected):
                assert mine["segments_info"] == theirs["segments_info"]
                assert torch.equal(mine["segmentation"], theirs["segmentation"])


def test_banded_upsampling_is_bitwise_interpolate():
    """Bands of columns, each upsampled from a whole-width column pass, equal `upsample_masks` (one `F.interpolate`
    per step) bit for bit: padded and unpadded inputs, up- and downscaled, many non-square sizes, narrow bands."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 16, 16, generator=g) * 4
    sizes = [(300, 200), (90, 400), (129, 1000), (777, 333), (40, 117), (1000, 129), (64, 300), (31, 30)]
    sizes += [tuple(torch.randint(20, 700, (2,), generator=g).tolist()) for _ in range(8)]
    placements = [Placement(0, 0, 0, 64, 64, (64, 64)), Placement(0, 0, 0, 40, 64, (64, 64)),
                  Placement(0, 0, 0, 64, 27, (64, 64)), Placement(0, 0, 0, 160, 100, (160, 160))]  # fmt: skip
    tested = split = 0
    for placement in placements:
        for size in sizes:
            if not segments_fast.banded(placement, size, chunk_elements=5000):
                continue
            tested += 1
            pieces = list(segments_fast.upsampled_bands(logits, placement, size, chunk_elements=5000))
            result = torch.empty(logits.shape[0], *size)
            for queries, columns, piece in pieces:
                result[queries, :, columns] = piece
            split += len({(columns.start, columns.stop) for _, columns, _ in pieces}) > 1
            # one query at a time, as the plain post-processing does at targets this large for `chunk_elements`
            expected = torch.cat([post_processing.upsample_masks(logits[[q]], placement, size) for q in range(5)])
            assert torch.equal(result, expected), (placement, size)
    assert tested >= 3 * len(sizes) and split >= len(sizes)  # many cases were cut into several bands of columns


@pytest.mark.parametrize("chunk_elements", [3000, 20000, post_processing.CHUNK_ELEMENTS])
@pytest.mark.parametrize("target_sizes", [[(300, 200), (90, 400)], [(700, 333), (129, 1000)], TARGET_SIZES])
def test_banded_segments_match_plain(chunk_elements, target_sizes):
    """The panoptic and instance post-processing the processor runs (`segments_fast`) against the plain reference at
    the same `chunk_elements`, targets cut into bands of columns or not, padded canvases. Panoptic results are equal;
    instance labels, ids and maps too, scores to float32 rounding of the mask sums (added band by band)."""
    outputs = fake_outputs(2, seed=14)
    logits = outputs.class_queries_logits, outputs.masks_queries_logits
    layout = EomtImageProcessor(size=PANOPTIC_SIZE).layout(target_sizes)
    calls = {
        "panoptic_segmentation": [{"threshold": 0.5}, {"threshold": 0.3, "stuff_classes": [0, 1], "mask_threshold": 0.6}],
        "instance_segmentation": [{"threshold": 0.3}, {"threshold": 0.2, "top_k": 30, "return_binary_maps": True}],
    }  # fmt: skip
    for name, option_sets in calls.items():
        for options in option_sets:
            plain = getattr(post_processing, name)(*logits, layout, chunk_elements=chunk_elements, **options)
            fast = getattr(segments_fast, name)(*logits, layout, chunk_elements=chunk_elements, **options)
            assert sum(len(r["segments_info"]) for r in plain) >= 3
            for mine, theirs in zip(fast, plain):
                assert torch.equal(mine["segmentation"], theirs["segmentation"])
                if name == "panoptic_segmentation":
                    assert mine["segments_info"] == theirs["segments_info"]
                    continue
                key = lambda info: [(s["id"], s["label_id"]) for s in info]
                assert key(mine["segments_info"]) == key(theirs["segments_info"])
                scores = [s["score"] for s in mine["segments_info"]]
                assert scores == pytest.approx([s["score"] for s in theirs["segments_info"]], abs=2e-6)


class LargeTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the number of elements of every tensor of at least `least` elements an op returns."""

    def __init__(self, least: int):
        super().__init__()
        self.least, self.sizes = least, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.numel() >= self.least:
                self.sizes.append(t.numel())
        return out


def test_banded_segments_hold_only_the_result_at_full_size():
    """Cut into bands, panoptic and instance post-processing create one tensor of the target's size, the result: the
    rest is a few bands of columns, whatever the number of queries."""
    target, chunk_elements = (800, 600), 2**16
    pixels = target[0] * target[1]
    outputs = fake_outputs(1, queries=40, classes=20, confident=30, seed=9)
    logits = outputs.class_queries_logits, outputs.masks_queries_logits
    layout = EomtImageProcessor(size=PANOPTIC_SIZE).layout([target])
    calls = {
        "panoptic_segmentation": {"threshold": 0.5, "overlap_mask_area_threshold": 0.5},
        "instance_segmentation": {"threshold": 0.1},
    }
    for name, options in calls.items():
        with LargeTensors(pixels // 2) as mode:
            result = getattr(segments_fast, name)(*logits, layout, chunk_elements=chunk_elements, **options)[0]
        assert len(result["segments_info"]) >= 3
        assert mode.sizes == [pixels], name  # the result, made once
        # the plain reference, for contrast, makes tens of full-size tensors
        with LargeTensors(pixels // 2) as mode:
            getattr(post_processing, name)(*logits, layout, chunk_elements=chunk_elements, **options)
        assert len(mode.sizes) >= 20


def test_instance_top_k_pairs(processors):
    ours, _ = processors
    outputs = fake_outputs(1, seed=6)
    per_query = ours.post_process_instance_segmentation(outputs, TARGET_SIZES[:1], threshold=0.5)[0]
    pairs = ours.post_process_instance_segmentation(outputs, TARGET_SIZES[:1], threshold=0.5, top_k=1000)[0]
    # above 0.5 a query has at most one class, so both rules find the same instances
    key = lambda r: sorted((s["label_id"], s["score"]) for s in r["segments_info"])
    assert key(per_query) == key(pairs)

    top = ours.post_process_instance_segmentation(
        outputs, TARGET_SIZES[:1], threshold=0.0, top_k=5, return_binary_maps=True
    )[0]
    masks, segments = top["segmentation"], top["segments_info"]
    assert masks.dtype == torch.bool and masks.shape == (len(segments), *TARGET_SIZES[0]) and len(segments) <= 5
    # hand check of the first pair: class probability × mean mask probability inside the mask
    probs = outputs.class_queries_logits[0].softmax(-1)[:, :-1]
    best = probs.flatten().argmax()
    query, label = divmod(int(best), probs.shape[1])
    placement = ours.layout(TARGET_SIZES[:1]).placements[0]
    logits = post_processing.upsample_masks(outputs.masks_queries_logits[0, [query]], placement, TARGET_SIZES[0])[0]
    inside = logits > 0
    expected = float(probs.flatten()[best] * logits.sigmoid()[inside].sum() / (inside.sum() + 1e-6))
    assert segments[0]["label_id"] == label and segments[0]["score"] == pytest.approx(expected, abs=2e-6)
    assert torch.equal(masks[0], inside)


def test_window_outputs_give_semantic_segments_for_panoptic_and_instance():
    ours = EomtImageProcessor(size=SEMANTIC_SIZE, do_split_image=True, do_pad=False)
    image = torch.randint(0, 256, (3, 40, 90), dtype=torch.uint8)
    offsets = ours(image)["patch_offsets"]
    outputs = fake_outputs(len(offsets), grid=8, seed=7)
    outputs.patch_offsets = offsets
    semantic = ours.post_process_semantic_segmentation(outputs, [(40, 90)])[0]
    for method in (ours.post_process_panoptic_segmentation, ours.post_process_instance_segmentation):
        result = method(outputs, [(40, 90)], threshold=0.9, mask_threshold=0.5, overlap_mask_area_threshold=0.5)[0]
        info = result["segments_info"]
        assert [s["label_id"] for s in info] == torch.unique(semantic).tolist()
        for s in info:
            assert torch.equal(result["segmentation"] == s["id"], semantic == s["label_id"])
        # hand check: a segment's score is the mean over its pixels of its class's share of the class scores,
        # from the full score maps (which match the built-in's, see the tests above)
        scores = ours.post_process_semantic_segmentation(outputs, [(40, 90)], return_segmentation_scores=True)[0]
        shares = scores.segmentation_scores.gather(0, semantic[None])[0] / scores.segmentation_scores.sum(0)
        expected = [float(shares[semantic == s["label_id"]].mean()) for s in info]
        assert [s["score"] for s in info] == pytest.approx(expected, abs=1e-5)


def test_empty_predictions(processors):
    ours, _ = processors
    outputs = fake_outputs(1, confident=0)
    outputs.class_queries_logits[..., -1] = 20.0  # every query says "no object"
    panoptic = ours.post_process_panoptic_segmentation(outputs, TARGET_SIZES[:1])[0]
    instance = ours.post_process_instance_segmentation(outputs, TARGET_SIZES[:1])[0]
    for result in (panoptic, instance):
        assert result["segments_info"] == [] and result["segmentation"].shape == TARGET_SIZES[0]
        assert bool((result["segmentation"] == -1).all())


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("windows", [False, True])
def test_large_targets_never_hold_all_queries_or_classes_at_full_size(windows):
    """A peer ran out of memory post-processing 2943×1435 images: 200 masks × full size ≈ 3 GB per tensor. No tensor
    here may hold more than a few full-size maps, whatever the number of queries or classes."""
    target, queries, classes = (1200, 600), 40, 150
    if windows:
        processor = EomtImageProcessor(size=SEMANTIC_SIZE, do_split_image=True, do_pad=False)
        offsets = processor(torch.zeros(3, *target, dtype=torch.uint8))["patch_offsets"]
    else:
        processor, offsets = EomtImageProcessor(size=PANOPTIC_SIZE), None
    outputs = fake_outputs(len(offsets) if windows else 1, queries=queries, classes=classes, confident=30, seed=9)
    outputs.patch_offsets = offsets
    calls = {
        "panoptic": lambda: processor.post_process_panoptic_segmentation(outputs, [target], threshold=0.1),
        "instance": lambda: processor.post_process_instance_segmentation(outputs, [target], threshold=0.1),
        "semantic": lambda: processor.post_process_semantic_segmentation(outputs, [target]),
        "segments": lambda: processor.post_process_semantic_segments(outputs, [target]),
    }
    pixels = target[0] * target[1]
    for name, call in calls.items():
        with LargestTensor() as mode:
            result = call()[0]
        segmentation = result if torch.is_tensor(result) else result["segmentation"]
        assert segmentation.shape == target
        assert mode.largest <= max(post_processing.CHUNK_ELEMENTS, 2 * pixels), name


def test_every_post_processing_takes_the_others_options_but_not_typos(processors):
    ours, _ = processors
    outputs = fake_outputs(1)
    shared = {"threshold": 0.5, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8, "stuff_classes": [0]}
    for task in ("semantic", "panoptic", "instance"):
        method = getattr(ours, f"post_process_{task}_segmentation")
        assert len(method(outputs, TARGET_SIZES[:1], **shared)) == 1
        with pytest.raises(TypeError, match=r"unknown option\(s\) \['treshold'\]"):
            method(outputs, TARGET_SIZES[:1], treshold=0.5)


def test_post_process_dispatches_by_task():
    panoptic = EomtImageProcessor(size=PANOPTIC_SIZE)
    windowed = EomtImageProcessor(size=SEMANTIC_SIZE, do_split_image=True, do_pad=False)
    outputs = fake_outputs(2, seed=11)
    options = {"threshold": 0.5, "stuff_classes": [0, 1]}
    expected = {
        "panoptic": panoptic.post_process_panoptic_segmentation(outputs, TARGET_SIZES, **options),
        "instance": panoptic.post_process_instance_segmentation(outputs, TARGET_SIZES, **options),
        "semantic": panoptic.post_process_semantic_segmentation(outputs, TARGET_SIZES, **options),
    }
    assert set(expected) == set(TASKS)
    for task, reference in expected.items():
        result = panoptic.post_process(outputs, task, TARGET_SIZES, **options)
        for mine, theirs in zip(result, reference):
            if task == "semantic":
                assert torch.equal(mine, theirs)
            else:
                assert mine["segments_info"] == theirs["segments_info"] and len(theirs["segments_info"]) >= 2
                assert torch.equal(mine["segmentation"], theirs["segmentation"])
    # semantic as segments: the panoptic format, from padded and from sliding-window outputs alike
    window_outputs = fake_outputs(3, grid=8, seed=12)
    window_outputs.patch_offsets = windowed(torch.zeros(3, 32, 80, dtype=torch.uint8))["patch_offsets"]
    for processor, out, sizes in ((panoptic, outputs, TARGET_SIZES), (windowed, window_outputs, [(32, 80)])):
        segments = processor.post_process(out, "semantic", sizes, as_segments=True, threshold=0.5)
        for result, theirs in zip(segments, processor.post_process_semantic_segments(out, sizes)):
            assert result["segments_info"] == theirs["segments_info"]
            assert torch.equal(result["segmentation"], theirs["segmentation"])
    with pytest.raises(ValueError, match="Unknown task 'depth'"):
        panoptic.post_process(outputs, "depth", TARGET_SIZES)


@pytest.mark.parametrize("windows", [False, True])
def test_runtime_outputs_as_numpy_dicts_give_the_same_segments(windows):
    """onnxruntime returns numpy arrays by output name: the processor takes them as they come."""
    if windows:
        processor = EomtImageProcessor(size=SEMANTIC_SIZE, do_split_image=True, do_pad=False)
        offsets = processor(torch.zeros(3, 40, 90, dtype=torch.uint8))["patch_offsets"]
        outputs, sizes = fake_outputs(len(offsets), grid=8, seed=13), [(40, 90)]
        outputs.patch_offsets = offsets
    else:
        processor, sizes = EomtImageProcessor(size=PANOPTIC_SIZE), TARGET_SIZES
        outputs = fake_outputs(2, seed=13)
    runtime = {
        "class_queries_logits": outputs.class_queries_logits.numpy(),
        "masks_queries_logits": outputs.masks_queries_logits.numpy(),
    }
    if windows:
        runtime["patch_offsets"] = np.stack([o.numpy() for o in outputs.patch_offsets])
    for task in TASKS:
        name = f"post_process_{task}_segmentation"
        options = {} if task == "semantic" else {"threshold": 0.5}
        expected, result = (getattr(processor, name)(o, target_sizes=sizes, **options) for o in (outputs, runtime))
        for mine, theirs in zip(result, expected):
            if task == "semantic":
                assert torch.equal(mine, theirs)
                continue
            assert mine["segments_info"] == theirs["segments_info"] and mine["segments_info"]
            assert torch.equal(mine["segmentation"], theirs["segmentation"])


def test_window_offsets_must_match_the_inputs():
    processor = EomtImageProcessor(size=SEMANTIC_SIZE, do_split_image=True, do_pad=False)
    outputs = fake_outputs(2, grid=8)
    outputs.patch_offsets = processor(torch.zeros(3, 32, 80, dtype=torch.uint8))["patch_offsets"]  # 3 windows
    with pytest.raises(ValueError, match=r"3 `patch_offsets` for 2 model inputs"):
        processor.post_process_semantic_segmentation(outputs, [(32, 80)])
    outputs.patch_offsets = outputs.patch_offsets[:2]  # two windows of one image: one size
    with pytest.raises(ValueError, match=r"2 target sizes for 1 image"):
        processor.post_process_semantic_segmentation(outputs, [(32, 80), (32, 80)])
