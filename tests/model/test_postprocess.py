"""Post-processing: known-answer panoptic cases, a plain-loop oracle, and the resize helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.postprocess import (
    instance_inference,
    panoptic_inference,
    postprocess_batch,
    resize_masks,
    segment_areas_and_boxes,
    semantic_inference,
)

# Label space of the hand-built cases: classes 0, 1 are things, 2, 3 stuff; column 4 = no object.
ISTHING = [True, True, False, False]
K = len(ISTHING)
H = W = 8
BIG = 12.0  # logit margin: softmax / sigmoid of this is ~1


def query(label: int, *, confidence: float = BIG) -> torch.Tensor:
    """(K + 1,) logits whose softmax puts nearly all mass (or `confidence`) on `label`."""
    logits = torch.zeros(K + 1)
    logits[label] = confidence
    return logits


def box_mask(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """(H, W) mask logits, +BIG inside rows y0:y1 and columns x0:x1, -BIG elsewhere."""
    m = torch.full((H, W), -BIG)
    m[y0:y1, x0:x1] = BIG
    return m


def run(queries: list[torch.Tensor], masks: list[torch.Tensor], **kwargs):
    return panoptic_inference(mask_cls=torch.stack(queries), mask_pred=torch.stack(masks),
                              isthing=ISTHING, **kwargs)


def test_two_stuff_queries_of_one_class_merge_into_one_segment():
    weaker, stronger = query(2, confidence=3.0), query(2)
    seg, info = run([weaker, stronger], [box_mask(0, 8, 0, 4), box_mask(0, 8, 4, 8)],
                    object_mask_threshold=0.5)
    assert len(info) == 1
    assert info[0]["score"] == pytest.approx(F.softmax(stronger, dim=0)[2].item()), "best score"
    assert info[0]["isthing"] is False and info[0]["category_id"] == 2
    assert (seg == info[0]["id"]).all()
    assert info[0]["area"] == H * W and info[0]["bbox"] == [0, 0, W, H]


def test_two_thing_queries_of_one_class_stay_separate():
    seg, info = run([query(0), query(0)], [box_mask(1, 3, 1, 4), box_mask(5, 8, 2, 7)])
    assert [s["id"] for s in info] == [1, 2]
    assert all(s["isthing"] and s["category_id"] == 0 for s in info)
    assert info[0]["bbox"] == [1, 1, 3, 2] and info[0]["area"] == 6
    assert info[1]["bbox"] == [2, 5, 5, 3] and info[1]["area"] == 15
    assert int((seg == 0).sum()) == H * W - 6 - 15


def test_query_mostly_covered_by_a_stronger_query_is_dropped():
    # Both cover rows 0..5; the weaker one also row 6, so it wins only 8 of its 56 pixels.
    strong, weak = query(0, confidence=BIG), query(1, confidence=4.0)
    seg, info = run([strong, weak], [box_mask(0, 6, 0, 8), box_mask(0, 7, 0, 8)],
                    object_mask_threshold=0.5)
    assert [s["category_id"] for s in info] == [0]
    assert (seg[:6] == 1).all()
    assert (seg[6:] == 0).all(), "pixels won by a dropped query are void"
    # With a lenient overlap threshold the weak query keeps its strip.
    seg, info = run([strong, weak], [box_mask(0, 6, 0, 8), box_mask(0, 7, 0, 8)],
                    object_mask_threshold=0.5, overlap_threshold=0.1)
    assert [s["category_id"] for s in info] == [0, 1]
    assert (seg[6] == 2).all()


def test_no_object_and_low_score_queries_are_dropped():
    no_object = query(K)
    unsure = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])  # best class prob ~0.3
    seg, info = run([no_object, unsure, query(3)],
                    [box_mask(0, 8, 0, 8), box_mask(0, 8, 0, 8), box_mask(0, 2, 0, 2)])
    assert [s["category_id"] for s in info] == [3]
    assert info[0]["area"] == 4 and int((seg != 0).sum()) == 4


def test_nothing_detected_gives_all_void_map():
    seg, info = run([query(K), query(K)], [box_mask(0, 8, 0, 8), box_mask(0, 4, 0, 4)])
    assert info == []
    assert seg.shape == (H, W) and seg.dtype == torch.int32 and not seg.any()


def test_category_ids_and_scores_are_reported():
    seg, info = run([query(0), query(3, confidence=3.0)],
                    [box_mask(0, 4, 0, 8), box_mask(4, 8, 0, 8)],
                    category_ids=[1, 7, 120, 184], object_mask_threshold=0.5)
    assert [s["category_id"] for s in info] == [1, 184]
    expected = F.softmax(query(3, confidence=3.0), dim=0)[3].item()
    assert info[1]["score"] == pytest.approx(expected)
    assert info[0]["score"] > 0.99


def test_mismatched_label_space_is_rejected():
    with pytest.raises(ValueError, match="isthing has 3 entries"):
        panoptic_inference(mask_cls=torch.zeros(2, K + 1), mask_pred=torch.zeros(2, H, W),
                           isthing=[True] * 3)


def reference_panoptic(mask_cls, mask_pred, isthing, thr, overlap):
    """The reference algorithm written as a plain per-query loop (the test oracle)."""
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(mask_cls.shape[-1] - 1) & (scores > thr)
    scores, labels, masks = scores[keep], labels[keep], mask_pred[keep].sigmoid()
    seg = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32)
    info, stuff, next_id = [], {}, 0
    if masks.shape[0] == 0:
        return seg, info
    ids = (scores.view(-1, 1, 1) * masks).argmax(0)
    for k in range(len(labels)):
        c = int(labels[k])
        area = int((ids == k).sum())
        orig = int((masks[k] >= 0.5).sum())
        mask = (ids == k) & (masks[k] >= 0.5)
        if area == 0 or orig == 0 or int(mask.sum()) == 0 or area / orig < overlap:
            continue
        if not isthing[c] and c in stuff:
            seg[mask] = stuff[c]
            continue
        next_id += 1
        if not isthing[c]:
            stuff[c] = next_id
        seg[mask] = next_id
        info.append({"id": next_id, "category_id": c, "isthing": isthing[c]})
    return seg, info


def random_masks(g: torch.Generator, q: int, h: int, w: int) -> torch.Tensor:
    """(q, h, w) noisy mask logits, each positive over a random rectangle (so they overlap)."""
    m = torch.randn(q, h, w, generator=g) - 4
    for i in range(q):
        y0, x0 = (int(torch.randint(0, n - 4, (1,), generator=g)) for n in (h, w))
        y1 = y0 + int(torch.randint(3, h - y0 + 1, (1,), generator=g))
        x1 = x0 + int(torch.randint(3, w - x0 + 1, (1,), generator=g))
        m[i, y0:y1, x0:x1] += 8
    return m


@pytest.mark.parametrize("seed", range(6))
def test_matches_plain_loop_reference_on_random_outputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, h, w = 20, 6, 24, 20
    isthing = [True, False, True, False, False, True]
    mask_cls = torch.randn(q, k + 1, generator=g) * 4
    mask_pred = random_masks(g, q, h, w)
    seg, info = panoptic_inference(mask_cls=mask_cls, mask_pred=mask_pred, isthing=isthing,
                                   object_mask_threshold=0.4, overlap_threshold=0.6)
    ref_seg, ref_info = reference_panoptic(mask_cls, mask_pred, isthing, 0.4, 0.6)
    assert info, "the random case should produce segments"
    assert torch.equal(seg, ref_seg)
    assert [{k: s[k] for k in ("id", "category_id", "isthing")} for s in info] == ref_info
    for s in info:
        ys, xs = torch.nonzero(seg == s["id"], as_tuple=True)
        assert s["area"] == len(ys) > 0
        assert s["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                             int(ys.max() - ys.min() + 1)]
    assert set(torch.unique(seg).tolist()) - {0} == {s["id"] for s in info}


def test_areas_and_boxes_of_absent_segment_are_zero():
    seg = torch.zeros(5, 6, dtype=torch.int32)
    seg[1:3, 4] = 2
    areas, boxes = segment_areas_and_boxes(seg, num_segments=3)
    assert areas == [0, 2, 0]
    assert boxes == [[0, 0, 0, 0], [4, 1, 1, 2], [0, 0, 0, 0]]


def test_semantic_inference_sums_class_probability_times_mask_probability():
    g = torch.Generator().manual_seed(0)
    mask_cls, mask_pred = torch.randn(5, K + 1, generator=g), torch.randn(5, 3, 4, generator=g)
    sem = semantic_inference(mask_cls=mask_cls, mask_pred=mask_pred)
    assert sem.shape == (K, 3, 4)
    probs = F.softmax(mask_cls, dim=-1)
    for c in range(K):
        expected = sum(probs[q, c] * mask_pred[q].sigmoid() for q in range(5))
        torch.testing.assert_close(sem[c], expected)


def test_instance_inference_scores_and_thing_filter():
    mask_cls = torch.stack([query(0, confidence=5.0), query(2, confidence=6.0)])
    mask_pred = torch.stack([box_mask(0, 2, 0, 2) * 0 + 2.0, box_mask(0, 4, 0, 4)])
    out = instance_inference(mask_cls=mask_cls, mask_pred=mask_pred, topk=2)
    # Best (query, class) pairs: query 1 / class 2, then query 0 / class 0.
    assert out["labels"].tolist() == [2, 0] and out["queries"].tolist() == [1, 0]
    p0 = F.softmax(mask_cls[0], dim=0)[0]
    assert out["scores"][1].item() == pytest.approx((p0 * torch.sigmoid(torch.tensor(2.0))).item())
    assert out["masks"][1].all() and int(out["masks"][0].sum()) == 16
    things = instance_inference(mask_cls=mask_cls, mask_pred=mask_pred, topk=2, thing_only=ISTHING)
    assert things["labels"].tolist() == [0]


def test_resize_crops_the_valid_top_left_region():
    m = torch.randn(3, 8, 12)
    out = resize_masks(m, padded_size=(8, 12), input_size=(5, 7), output_size=(5, 7))
    assert torch.equal(out, m[:, :5, :7])
    # Positive inside the valid region, negative padding: every output pixel stays positive.
    low = torch.full((2, 8, 12), -5.0)
    low[0, :5, :8] = 15.0  # outweighs the padding even where a corner pixel blends with it
    low[1] = -low[0]
    out = resize_masks(low, padded_size=(32, 48), input_size=(20, 32), output_size=(50, 80))
    assert out.shape == (2, 50, 80)
    assert (out[0] > 0).all() and (out[1] < 0).all()


def test_resize_rejects_input_larger_than_padding():
    with pytest.raises(ValueError, match="larger than the padded size"):
        resize_masks(torch.zeros(1, 4, 4), padded_size=(16, 16), input_size=(17, 16),
                     output_size=(17, 16))


def test_batch_helper_matches_resizing_every_query():
    g = torch.Generator().manual_seed(3)
    b, q, k = 2, 12, 5
    isthing = [True, True, False, False, True]
    logits = torch.randn(b, q, k + 1, generator=g) * 8
    masks = torch.stack([random_masks(g, q, 8, 10) for _ in range(b)])
    input_sizes, output_sizes = [(32, 40), (20, 27)], [(64, 80), (45, 61)]
    results = postprocess_batch(pred_logits=logits, pred_masks=masks, input_sizes=input_sizes,
                                output_sizes=output_sizes, isthing=isthing, semantic=True,
                                instance=True, object_mask_threshold=0.3, overlap_threshold=0.6,
                                topk_per_image=10)
    only_panoptic = postprocess_batch(pred_logits=logits, pred_masks=masks,
                                      input_sizes=input_sizes, output_sizes=output_sizes,
                                      isthing=isthing, object_mask_threshold=0.3, instance=True,
                                      overlap_threshold=0.6, topk_per_image=10)
    for i, (res, res2) in enumerate(zip(results, only_panoptic)):
        full = resize_masks(masks[i], padded_size=(32, 40), input_size=input_sizes[i],
                            output_size=output_sizes[i])
        seg, info = panoptic_inference(mask_cls=logits[i], mask_pred=full, isthing=isthing,
                                       object_mask_threshold=0.3, overlap_threshold=0.6)
        assert seg.shape == output_sizes[i]
        assert info, "the random case should produce segments"
        for r in (res, res2):
            assert torch.equal(r["panoptic_seg"][0], seg) and r["panoptic_seg"][1] == info
        assert res["sem_seg"].shape == (k, *output_sizes[i])
        inst = instance_inference(mask_cls=logits[i], mask_pred=full, topk=10,
                                  thing_only=isthing)
        for r in (res, res2):
            assert torch.equal(r["instances"]["masks"], inst["masks"])
            torch.testing.assert_close(r["instances"]["scores"], inst["scores"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    isthing = [True, False, True, False, False, True]
    logits = torch.randn(2, 20, 7, generator=g) * 8
    masks = torch.stack([random_masks(g, 20, 16, 12) for _ in range(2)])
    kwargs = dict(input_sizes=[(64, 48), (50, 40)], output_sizes=[(120, 90), (75, 61)],
                  isthing=isthing, instance=True, object_mask_threshold=0.3)
    cpu = postprocess_batch(pred_logits=logits, pred_masks=masks, **kwargs)
    gpu = postprocess_batch(pred_logits=logits.cuda(), pred_masks=masks.cuda(), **kwargs)
    for a, b in zip(cpu, gpu):
        assert a["panoptic_seg"][1] == pytest.approx(b["panoptic_seg"][1])
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0].cpu())
