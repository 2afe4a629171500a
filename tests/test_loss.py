"""The set loss: matching, point sampling, class and mask terms, checked against hand-built cases."""

import contextlib
import itertools

import numpy as np
import torch
import torch.nn.functional as F

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation
from modeling_eomt import loss as loss_module
from modeling_eomt.head import MaskPrediction, compute_mask_logits
from modeling_eomt.loss import (
    EomtLoss,
    bce_cost,
    dice_loss,
    point_sample,
    point_sample_logits,
    sample_rows,
)


def make_loss(**overrides) -> EomtLoss:
    return EomtLoss(EomtConfig(**{"num_labels": 4, "train_num_points": 2048, **overrides}))


def quadrant_masks() -> torch.Tensor:
    masks = torch.zeros(4, 32, 32)
    masks[0, :16, :16] = masks[1, :16, 16:] = masks[2, 16:, :16] = masks[3, 16:, 16:] = 1
    return masks


def test_matcher_recovers_the_permutation_of_confident_predictions():
    torch.manual_seed(0)
    targets = quadrant_masks()
    classes = torch.tensor([0, 1, 2, 3])
    permutation = torch.tensor([3, 0, 2, 1])  # query i predicts target permutation[i]
    # Pixel embeddings: one-hot quadrant of each pixel; query i scores +10 on its quadrant and -10 elsewhere.
    pixel_embeddings = targets.permute(1, 2, 0)[None]
    mask_embeddings = (F.one_hot(permutation, 4).float() * 2 - 1)[None] * 10
    torch.testing.assert_close(
        compute_mask_logits(mask_embeddings, pixel_embeddings)[0], (targets[permutation] * 2 - 1) * 10
    )
    class_logits = F.one_hot(classes[permutation], 5)[None].float() * 10
    ((rows, cols),) = make_loss().match(mask_embeddings, pixel_embeddings, class_logits, [targets], [classes])
    assert torch.equal(cols[rows.argsort()], permutation)


def test_loss_of_one_prediction_weights_its_terms_and_prefers_the_right_masks():
    # `targets` prepares a batch once (float masks, the number of masks) and `forward` scores one prediction: far
    # smaller for the quadrant predictions above than with the masks swapped among the queries, and each term scaled
    # by its configured weight.
    masks, classes = quadrant_masks().bool(), torch.tensor([0, 1, 2, 3])
    pixel_embeddings = quadrant_masks().permute(1, 2, 0)[None]
    class_logits = F.one_hot(classes, 5)[None].float() * 10

    def scored(loss: EomtLoss, order: list[int]) -> dict:
        torch.manual_seed(0)
        targets = loss.targets([masks], [classes], torch.device("cpu"))
        assert targets.masks[0].dtype == torch.float32 and float(targets.num_masks) == 4
        mask_embeddings = (F.one_hot(torch.tensor(order), 4).float() * 2 - 1)[None] * 10
        return loss(MaskPrediction(mask_embeddings, pixel_embeddings, class_logits), targets)

    right, swapped = scored(make_loss(), [0, 1, 2, 3]), scored(make_loss(), [1, 0, 3, 2])
    assert set(right) == {"loss_cross_entropy", "loss_mask", "loss_dice"}
    assert sum(right.values()) < 0.25 * sum(swapped.values())
    config = {"mask_weight": 3.0, "dice_weight": 2.0, "class_weight": 0.5}
    term = {"mask_weight": "loss_mask", "dice_weight": "loss_dice", "class_weight": "loss_cross_entropy"}
    weighted = scored(make_loss(**config), [1, 0, 3, 2])
    unit = scored(make_loss(**dict.fromkeys(config, 1.0)), [1, 0, 3, 2])
    for key, weight in config.items():
        torch.testing.assert_close(weighted[term[key]], weight * unit[term[key]])


def test_matching_is_optimal_against_brute_force():
    torch.manual_seed(1)
    loss = make_loss(class_weight=2.0)
    targets, classes = quadrant_masks()[:3], torch.tensor([1, 1, 2])
    mask_embeddings, pixel_embeddings, class_logits = (
        torch.randn(1, 4, 6),
        torch.randn(1, 8, 8, 6),
        torch.randn(1, 4, 5),
    )
    # The matcher's first draw is its point set: reproduce it to compute the same costs independently.
    torch.manual_seed(2)
    points = torch.rand(1, 2048, 2)
    torch.manual_seed(2)
    ((rows, cols),) = loss.match(mask_embeddings, pixel_embeddings, class_logits, [targets], [classes])

    # Independently: full-resolution logits, sampled, and the BCE cost pair by pair.
    full_logits = torch.einsum("qd,hwd->qhw", mask_embeddings[0], pixel_embeddings[0])
    pred, tgt = point_sample(full_logits, points), point_sample(targets, points)
    bce = torch.stack(
        [F.binary_cross_entropy_with_logits(pred, t.expand_as(pred), reduction="none").mean(1) for t in tgt], dim=1
    )
    cost = 5 * bce - 2 * class_logits[0].softmax(-1)[:, classes] + 5 * dice_loss(pred, tgt, pairwise=True)
    best = min(itertools.permutations(range(4), 3), key=lambda r: sum(cost[q, t] for t, q in enumerate(r)))
    assert [int(rows[cols == t]) for t in range(3)] == list(best)


def test_point_sample_matches_grid_sample_and_sample_rows_selects_maps():
    maps = torch.randn(5, 9, 13)
    points = torch.rand(3, 50, 2)
    rows = torch.tensor([4, 0, 2])
    expected = torch.stack(
        [
            F.grid_sample(maps[r][None, None], (2 * points[i] - 1)[None, :, None], align_corners=False)[0, 0, :, 0]
            for i, r in enumerate(rows)
        ]
    )
    torch.testing.assert_close(sample_rows(maps, rows, points), expected)
    # Exact at pixel centres.
    centre = torch.tensor([[[(6 + 0.5) / 13, (2 + 0.5) / 9]]])
    torch.testing.assert_close(point_sample(maps[:1], centre)[0, 0], maps[0, 2, 6])


def test_point_sampled_logits_equal_sampled_full_logits():
    mask_embeddings, pixel_embeddings = torch.randn(7, 16), torch.randn(10, 12, 16)
    points = torch.rand(1, 300, 2)
    full = torch.einsum("qd,hwd->qhw", mask_embeddings, pixel_embeddings)
    torch.testing.assert_close(compute_mask_logits(mask_embeddings, pixel_embeddings), full, atol=1e-5, rtol=1e-5)
    expected = point_sample(full, points)
    torch.testing.assert_close(
        point_sample_logits(mask_embeddings, pixel_embeddings, points), expected, atol=1e-4, rtol=1e-4
    )


def test_bce_cost_equals_pairwise_bce_even_for_large_logits():
    logits = torch.cat([torch.randn(3, 500) * 3, torch.full((1, 500), -60.0), torch.full((1, 500), 60.0)])
    targets = (torch.rand(4, 500) > 0.5).float()
    expected = torch.stack(
        [F.binary_cross_entropy_with_logits(logits, t.expand_as(logits), reduction="none").mean(1) for t in targets],
        dim=1,
    )
    torch.testing.assert_close(bce_cost(logits, targets), expected, atol=1e-4, rtol=1e-5)


def test_matching_under_autocast_uses_float32_costs(monkeypatch):
    # Half-precision costs overflow (float16 sums of thousands of points) or lose the differences that decide the
    # matching: the matcher must compute them in float32 whatever the autocast context. (CPU bfloat16 autocast
    # leaves these products in float32 here, so only float16 can show the difference on this machine.)
    costs = []
    solve = loss_module.linear_sum_assignment
    monkeypatch.setattr(loss_module, "linear_sum_assignment", lambda cost: costs.append(cost) or solve(cost))
    targets, classes = quadrant_masks(), torch.tensor([0, 1, 2, 3])
    mask_embeddings, pixel_embeddings = torch.randn(1, 10, 16), torch.randn(1, 32, 32, 16)
    class_logits = torch.randn(1, 10, 5)
    for context in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.float16)):
        torch.manual_seed(0)
        with context:
            make_loss().match(mask_embeddings, pixel_embeddings, class_logits, [targets], [classes])
    np.testing.assert_allclose(costs[1], costs[0], rtol=1e-5, atol=1e-5)


def test_class_loss_weights_no_object_queries():
    loss = make_loss(no_object_weight=0.1)
    class_logits = torch.randn(1, 3, 5)
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    value = loss.class_loss(class_logits, [torch.tensor([2])], indices)
    target = torch.tensor([4, 2, 4])
    weights = torch.tensor([0.1, 1.0, 0.1])
    per_query = F.cross_entropy(class_logits[0], target, reduction="none")
    torch.testing.assert_close(value, (weights * per_query).sum() / weights.sum())


def test_mask_terms_are_a_mean_over_target_masks():
    torch.manual_seed(0)
    config = EomtConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_blocks=1,
        image_size=32,
        num_queries=4,
        num_labels=4,
        train_num_points=256,
    )
    model = EomtForUniversalSegmentation(config).eval()
    model.set_attn_mask_probs([0.0])
    image, masks, classes = torch.randn(1, 3, 32, 32), quadrant_masks()[:2], torch.tensor([0, 3])
    torch.manual_seed(1)
    single = model(image, mask_labels=[masks], class_labels=[classes]).loss_dict
    torch.manual_seed(1)
    double = model(image.repeat(2, 1, 1, 1), mask_labels=[masks] * 2, class_labels=[classes] * 2).loss_dict
    # Twice the masks, twice the sum: the normalised terms stay close (points are random, so not equal).
    for key in ("loss_mask", "loss_dice"):
        assert abs(double[key] - single[key]) < 0.1 * single[key]
