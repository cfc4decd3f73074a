"""HungarianMatcher: minimal total cost (against brute force), edge cases and errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.matcher import HungarianMatcher
from model.point_sampling import point_sample

NUM_CLASSES = 3
NUM_POINTS = 64


def random_image(g: torch.Generator, *, num_queries: int, num_targets: int):
    """Predictions (Q, K + 1), (Q, 8, 8) and a target dict with (N, 16, 16) bool masks."""
    logits = torch.randn(num_queries, NUM_CLASSES + 1, generator=g) * 2
    masks = torch.randn(num_queries, 8, 8, generator=g) * 3
    target = {
        "labels": torch.randint(0, NUM_CLASSES, (num_targets,), generator=g),
        "masks": torch.rand(num_targets, 16, 16, generator=g) > 0.5,
    }
    return logits, masks, target


def cost_by_definition(logits, masks, target, points, matcher) -> torch.Tensor:
    """(Q, N) float64 cost written out pair by pair from the matching cost's definition."""
    probs = logits.double().softmax(-1)
    pred = point_sample(masks[None].double(), points[None].double())[0]  # (Q, P)
    tgt = point_sample(target["masks"][None].double(), points[None].double())[0]  # (N, P)
    cost = torch.zeros(len(logits), len(tgt), dtype=torch.float64)
    for q in range(len(logits)):
        for t in range(len(tgt)):
            x, y = pred[q], tgt[t]
            bce = (y * torch.log1p(torch.exp(-x)) + (1 - y) * torch.log1p(torch.exp(x))).mean()
            p = torch.sigmoid(x)
            dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            cost[q, t] = (
                -matcher.cost_class * probs[q, target["labels"][t]]
                + matcher.cost_mask * bce
                + matcher.cost_dice * dice
            )
    return cost


def brute_force(cost: torch.Tensor) -> list[tuple[float, tuple[int, ...]]]:
    """Total cost of every injective map targets -> queries, cheapest first."""
    num_queries, num_targets = cost.shape
    totals = [
        (sum(float(cost[q, t]) for t, q in enumerate(queries)), queries)
        for queries in itertools.permutations(range(num_queries), num_targets)
    ]
    return sorted(totals)


@pytest.mark.parametrize("seed", range(12))
def test_matching_reaches_the_brute_force_minimum(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries = int(torch.randint(1, 7, (1,), generator=g))
    num_targets = int(torch.randint(1, min(4, num_queries) + 1, (1,), generator=g))
    logits, masks, target = random_image(g, num_queries=num_queries, num_targets=num_targets)
    matcher = HungarianMatcher(num_points=NUM_POINTS)

    [(query_idx, target_idx)] = matcher(
        logits[None], masks[None], [target], generators=[torch.Generator().manual_seed(100 + seed)]
    )
    # The matcher draws its points as (P, 2) uniform values from the image's generator.
    points = torch.rand(NUM_POINTS, 2, generator=torch.Generator().manual_seed(100 + seed))
    cost = cost_by_definition(logits, masks, target, points, matcher)
    ranked = brute_force(cost)

    assert query_idx.dtype == target_idx.dtype == torch.int64
    assert len(query_idx) == len(target_idx) == num_targets
    assert sorted(target_idx.tolist()) == list(range(num_targets))
    total = float(cost[query_idx, target_idx].sum())
    assert math.isclose(total, ranked[0][0], rel_tol=1e-5, abs_tol=1e-5)
    if len(ranked) == 1 or ranked[1][0] - ranked[0][0] > 1e-4:
        got = dict(zip(target_idx.tolist(), query_idx.tolist()))
        assert tuple(got[t] for t in range(num_targets)) == ranked[0][1]


def test_queries_that_copy_the_targets_are_matched_to_them():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 0, 1])
    target_masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    target_masks[0, :16], target_masks[1, 16:, :16], target_masks[2, 16:, 16:] = True, True, True
    # Query q predicts target order[q]; the rest predict nothing.
    order = {4: 0, 1: 1, 6: 2}
    logits = torch.randn(8, NUM_CLASSES + 1, generator=g)
    masks = torch.full((8, 32, 32), -10.0)
    for q, t in order.items():
        logits[q, labels[t]] = 10.0
        masks[q][target_masks[t]] = 10.0
    matcher = HungarianMatcher(num_points=256)
    target = {"labels": labels, "masks": target_masks}
    [(query_idx, target_idx)] = matcher(logits[None], masks[None], [target])
    assert dict(zip(query_idx.tolist(), target_idx.tolist())) == order


def test_more_targets_than_queries_matches_every_query():
    g = torch.Generator().manual_seed(1)
    logits, masks, target = random_image(g, num_queries=2, num_targets=5)
    [(query_idx, target_idx)] = HungarianMatcher(num_points=NUM_POINTS)(
        logits[None], masks[None], [target]
    )
    assert query_idx.tolist() == [0, 1]
    assert len(set(target_idx.tolist())) == 2


def test_images_without_targets_get_empty_matches():
    g = torch.Generator().manual_seed(2)
    logits_a, masks_a, target_a = random_image(g, num_queries=5, num_targets=0)
    logits_b, masks_b, target_b = random_image(g, num_queries=5, num_targets=2)
    matches = HungarianMatcher(num_points=NUM_POINTS)(
        torch.stack([logits_a, logits_b]), torch.stack([masks_a, masks_b]), [target_a, target_b]
    )
    assert [len(q) for q, _ in matches] == [0, 2]
    assert matches[0][0].dtype == matches[0][1].dtype == torch.int64


def test_non_finite_logits_raise_an_actionable_error():
    g = torch.Generator().manual_seed(3)
    logits, masks, target = random_image(g, num_queries=4, num_targets=2)
    masks[1, 3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite matching cost.*lower the learning"):
        HungarianMatcher(num_points=NUM_POINTS)(logits[None], masks[None], [target])


def test_wrong_number_of_generators_is_refused():
    g = torch.Generator().manual_seed(4)
    logits, masks, target = random_image(g, num_queries=4, num_targets=2)
    with pytest.raises(ValueError, match="one per image"):
        HungarianMatcher(num_points=NUM_POINTS)(
            logits[None], masks[None], [target], generators=[torch.Generator()] * 2
        )


def test_low_precision_inputs_are_matched_in_float32():
    g = torch.Generator().manual_seed(5)
    logits, masks, target = random_image(g, num_queries=6, num_targets=3)
    logits, masks = logits.bfloat16(), masks.bfloat16()
    matcher = HungarianMatcher(num_points=NUM_POINTS)
    points = torch.rand(NUM_POINTS, 2, generator=torch.Generator().manual_seed(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.cost_matrix(
            logits=logits,
            masks=masks,
            target_labels=target["labels"],
            target_masks=target["masks"],
            point_coords=points,
        )
        [match] = matcher(
            logits[None], masks[None], [target], generators=[torch.Generator().manual_seed(9)]
        )
    want = cost_by_definition(logits.float(), masks.float(), target, points, matcher)
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost.double(), want, rtol=1e-5, atol=1e-5)
    assert math.isclose(float(want[match].sum()), brute_force(want)[0][0], rel_tol=1e-5)


def test_all_zero_costs_are_refused():
    with pytest.raises(ValueError, match="all matching costs are 0"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)


def test_pairwise_bce_from_probabilities_holds_for_extreme_logits():
    from model.matcher import pairwise_sigmoid_bce

    logits = torch.tensor([[-200.0, -90.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 90.0, 200.0]])
    targets = torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 0.25, 0.0, 1.0, 0.0, 1.0]])
    x, t = logits.double(), targets.double()
    want = (torch.nn.functional.softplus(x) - t * x).mean(-1, keepdim=True)
    got = pairwise_sigmoid_bce(logits, targets)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
