"""SetCriterion: loss terms, weights, gradients, batch-split equivalence and Hugging Face parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.criterion import LossConfig, SetCriterion, build_criterion
from model.point_sampling import seeded_generators

K = 4  # classes without "no object"
Q = 6  # queries
POINTS = 128


def small_criterion(**overrides) -> SetCriterion:
    return build_criterion(LossConfig(num_points=POINTS, **overrides), num_classes=K)


def box_targets(g: torch.Generator, counts: list[int], size: int = 32) -> list[dict]:
    """One dict per image with `count` random rectangles as (N, size, size) bool masks."""
    targets = []
    for count in counts:
        masks = torch.zeros(count, size, size, dtype=torch.bool)
        for m in masks:
            y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(4, size // 2, (2,), generator=g).tolist()
            m[y0 : y0 + h, x0 : x0 + w] = True
        targets.append({"labels": torch.randint(0, K, (count,), generator=g), "masks": masks})
    return targets


def random_outputs(g: torch.Generator, *, batch: int, num_aux: int, requires_grad=False) -> dict:
    def pair():
        return {
            "pred_logits": torch.randn(batch, Q, K + 1, generator=g).requires_grad_(requires_grad),
            "pred_masks": (torch.randn(batch, Q, 8, 8, generator=g) * 3).requires_grad_(
                requires_grad
            ),
        }

    outputs = pair()
    outputs["aux_outputs"] = [pair() for _ in range(num_aux)]
    return outputs


def test_losses_are_finite_positive_and_named_per_layer():
    g = torch.Generator().manual_seed(0)
    outputs = random_outputs(g, batch=2, num_aux=3)
    targets = box_targets(g, [3, 1])
    losses = small_criterion()(outputs, targets, num_masks=4)
    names = ["loss_ce", "loss_mask", "loss_dice"]
    assert set(losses) == {n + s for n in names for s in ["", "_0", "_1", "_2"]}
    for name, value in losses.items():
        assert value.dim() == 0 and value.dtype == torch.float32, name
        assert torch.isfinite(value) and value > 0, name


def test_deep_supervision_off_ignores_aux_outputs():
    g = torch.Generator().manual_seed(1)
    losses = small_criterion(deep_supervision=False)(
        random_outputs(g, batch=1, num_aux=2), box_targets(g, [2]), num_masks=2
    )
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}


def fixed_matcher(matches):
    def match(pred_logits, pred_masks, targets, *, generators=None):
        return [(torch.tensor(q), torch.tensor(t)) for q, t in matches]

    return match


def test_no_object_class_is_down_weighted_in_the_cross_entropy():
    logits = torch.tensor([[[1.0, -0.5, 0.3], [0.2, 0.1, 2.0], [-1.0, 1.5, 0.0]]])  # (1, 3, 2 + 1)
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}]
    criterion = SetCriterion(
        num_classes=2, matcher=fixed_matcher([([2], [0])]), no_object_weight=0.1, num_points=16
    )
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 3, 4, 4)}
    loss_ce = criterion(outputs, targets, num_masks=1)["loss_ce"]

    # Query 2 is matched to class 1; queries 0 and 1 should say "no object" (class 2).
    wanted = [2, 2, 1]
    weights = [0.1, 0.1, 1.0]
    nll = [
        -math.log(math.exp(row[c]) / sum(math.exp(v) for v in row))
        for row, c in zip(logits[0].tolist(), wanted)
    ]
    expected = sum(w * n for w, n in zip(weights, nll)) / sum(weights)
    assert math.isclose(loss_ce.item(), expected, rel_tol=1e-6)
    assert not math.isclose(loss_ce.item(), sum(nll) / 3, rel_tol=1e-3)


def test_total_loss_weights_every_layer_like_its_base_term():
    criterion = small_criterion(class_weight=2.0, mask_weight=5.0, dice_weight=3.0)
    losses = {
        "loss_ce": torch.tensor(1.0),
        "loss_mask": torch.tensor(2.0),
        "loss_dice": torch.tensor(4.0),
        "loss_ce_0": torch.tensor(8.0),
        "loss_dice_11": torch.tensor(16.0),
    }
    assert criterion.total_loss(losses).item() == 2 + 10 + 12 + 16 + 48
    with pytest.raises(KeyError, match="no weight for loss term 'loss_box'"):
        criterion.total_loss({"loss_box": torch.tensor(1.0)})


def test_gradient_reaches_logits_and_masks_of_every_layer():
    g = torch.Generator().manual_seed(2)
    outputs = random_outputs(g, batch=2, num_aux=1, requires_grad=True)
    criterion = small_criterion()
    criterion.total_loss(criterion(outputs, box_targets(g, [2, 2]), num_masks=4)).backward()
    for layer in (outputs, outputs["aux_outputs"][0]):
        for key in ("pred_logits", "pred_masks"):
            grad = layer[key].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key


def test_fitting_one_batch_drives_the_loss_down():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    targets = box_targets(g, [3, 2])
    logits = torch.zeros(2, Q, K + 1, requires_grad=True)
    masks = torch.zeros(2, Q, 16, 16).normal_(generator=g).requires_grad_(True)
    criterion = small_criterion()
    optimizer = torch.optim.Adam([logits, masks], lr=0.1)

    def loss_value(seed: int) -> torch.Tensor:
        outputs = {"pred_logits": logits, "pred_masks": masks}
        generators = seeded_generators(seeds=[seed, seed + 1])
        return criterion.total_loss(
            criterion(outputs, targets, num_masks=5, generators=generators)
        )

    with torch.no_grad():
        initial = loss_value(1000).item()
    for step in range(50):
        optimizer.zero_grad()
        loss_value(step).backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_value(1000).item()
    assert final < 0.5 * initial, (initial, final)


def test_splitting_a_batch_across_workers_gives_the_same_gradient():
    """Two "workers" with images [a, b] and [c] reproduce one worker with [a, b, c]."""
    g = torch.Generator().manual_seed(4)
    outputs = random_outputs(g, batch=3, num_aux=1, requires_grad=True)
    targets = box_targets(g, [2, 0, 3])
    seeds = [11, 12, 13]
    criterion = small_criterion()

    norm = criterion.local_normalizers(targets, num_queries=Q)
    full = criterion(
        outputs,
        targets,
        num_masks=norm[0],
        class_weight_sum=norm[1],
        generators=seeded_generators(seeds=seeds),
    )
    full_grads = torch.autograd.grad(criterion.total_loss(full), _leaves(outputs))

    parts = [slice(0, 2), slice(2, 3)]
    # What data-parallel training passes: the normalisers averaged over the workers.
    mean_norm = sum(criterion.local_normalizers(targets[p], num_queries=Q) for p in parts) / 2
    split = [
        criterion(
            _slice_outputs(outputs, p),
            targets[p],
            num_masks=mean_norm[0],
            class_weight_sum=mean_norm[1],
            generators=seeded_generators(seeds=seeds[p]),
        )
        for p in parts
    ]
    for name, value in full.items():
        torch.testing.assert_close((split[0][name] + split[1][name]) / 2, value)
    # Data-parallel training averages the workers' gradients.
    split_total = sum(criterion.total_loss(losses) for losses in split) / 2
    split_grads = torch.autograd.grad(split_total, _leaves(outputs))
    for a, b in zip(split_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _leaves(outputs: dict) -> list[torch.Tensor]:
    layers = [outputs, *outputs["aux_outputs"]]
    return [layer[key] for layer in layers for key in ("pred_logits", "pred_masks")]


def _slice_outputs(outputs: dict, part: slice) -> dict:
    def cut(layer):
        return {key: layer[key][part] for key in ("pred_logits", "pred_masks")}

    return {**cut(outputs), "aux_outputs": [cut(aux) for aux in outputs["aux_outputs"]]}


def test_same_generators_give_identical_losses():
    g = torch.Generator().manual_seed(5)
    outputs = random_outputs(g, batch=2, num_aux=1)
    targets = box_targets(g, [2, 3])
    criterion = small_criterion()
    first = criterion(outputs, targets, num_masks=5, generators=seeded_generators(seeds=[1, 2]))
    again = criterion(outputs, targets, num_masks=5, generators=seeded_generators(seeds=[1, 2]))
    other = criterion(outputs, targets, num_masks=5, generators=seeded_generators(seeds=[3, 4]))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["loss_mask"], other["loss_mask"])


def test_a_batch_without_targets_still_back_propagates():
    g = torch.Generator().manual_seed(6)
    outputs = random_outputs(g, batch=2, num_aux=0, requires_grad=True)
    targets = box_targets(g, [0, 0])
    criterion = small_criterion()
    losses = criterion(outputs, targets, num_masks=0)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    no_object = torch.full((2 * Q,), K)
    expected_ce = F.cross_entropy(outputs["pred_logits"].reshape(-1, K + 1), no_object)
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    criterion.total_loss(losses).backward()
    assert outputs["pred_masks"].grad is not None


def test_low_precision_outputs_give_float32_losses():
    g = torch.Generator().manual_seed(7)
    outputs = random_outputs(g, batch=2, num_aux=1)
    outputs = {
        "pred_logits": outputs["pred_logits"].bfloat16(),
        "pred_masks": outputs["pred_masks"].bfloat16(),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = small_criterion()(outputs, box_targets(g, [1, 2]), num_masks=3)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_given_matches_replace_the_matcher():
    """`match` (the host step) then `forward(matches=...)` gives the plain forward's losses: the
    same assignments, and with seeded generators the same mask-loss points."""
    g = torch.Generator().manual_seed(9)
    outputs = random_outputs(g, batch=2, num_aux=2)
    targets = box_targets(g, [2, 3])
    criterion = small_criterion()
    matches = criterion.match(outputs, targets)
    assert len(matches) == 3 and all(len(layer) == 2 for layer in matches)
    assert [len(q) for q, _ in matches[0]] == [2, 3]

    layers = iter(matches)  # the matcher's assignments again, layer by layer
    frozen = SetCriterion(num_classes=K, matcher=lambda *args, **kwargs: next(layers),
                          num_points=POINTS)
    plain = frozen(outputs, targets, num_masks=5, generators=seeded_generators(seeds=[1, 2]))
    given = criterion(outputs, targets, num_masks=5, generators=seeded_generators(seeds=[1, 2]),
                      matches=matches)
    assert set(given) == set(plain)
    assert all(torch.equal(given[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="got matches for 1 layers but the outputs have 3"):
        criterion(outputs, targets, num_masks=5, matches=matches[:1])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"labels": torch.tensor([0, K])}, r"labels must be contiguous class indices in \[0, 4\)"),
        ({"masks": torch.zeros(3, 8, 8)}, "give one \\(H, W\\) mask per label"),
    ],
)
def test_targets_that_do_not_fit_are_refused_with_the_fix(bad, message):
    g = torch.Generator().manual_seed(8)
    target = {**box_targets(g, [2])[0], **bad}
    with pytest.raises(ValueError, match=message):
        small_criterion()(random_outputs(g, batch=1, num_aux=0), [target], num_masks=2)


@pytest.mark.parametrize("counts", [[3], [3, 2]])
def test_matches_hugging_face_mask2former_loss(counts):
    """Same points: both draw from the global RNG, in the same order once Hugging Face samples
    the importance points image by image (it samples the whole batch in one draw)."""
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    from transformers import Mask2FormerConfig

    config = Mask2FormerConfig(
        num_labels=K,
        train_num_points=POINTS,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    reference = hf.Mask2FormerLoss(config, weight_dict={})
    batch_draw = reference.sample_points_using_uncertainty

    def per_image_draw(logits, *args):
        return torch.cat([batch_draw(chunk, *args) for chunk in logits.split(counts)])

    reference.sample_points_using_uncertainty = per_image_draw
    g = torch.Generator().manual_seed(9)
    outputs = random_outputs(g, batch=len(counts), num_aux=2)
    targets = box_targets(g, counts)

    torch.manual_seed(1234)
    ours = small_criterion()(outputs, targets, num_masks=sum(counts))
    torch.manual_seed(1234)
    theirs = reference(
        masks_queries_logits=outputs["pred_masks"],
        class_queries_logits=outputs["pred_logits"],
        mask_labels=[t["masks"].float() for t in targets],
        class_labels=[t["labels"] for t in targets],
        auxiliary_predictions=[
            {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
            for a in outputs["aux_outputs"]
        ],
    )
    theirs = {k.replace("loss_cross_entropy", "loss_ce"): v for k, v in theirs.items()}
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
