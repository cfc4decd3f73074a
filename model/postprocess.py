"""Turn Mask2Former's raw outputs into panoptic, semantic and instance segmentations.

The semantics follow the reference MaskFormer / Mask2Former inference (facebookresearch
`maskformer_model.py`: `panoptic_inference`, `semantic_inference`, `instance_inference`, and
detectron2's `sem_seg_postprocess` for undoing the padding and resizing), so that scores and
PQ match the published models. Additions: every panoptic segment carries its class `score`,
`area` and COCO `bbox`, and only the queries a task can use are upsampled.

    out = net(images, aux_outputs=False)                      # padded batch (B, 3, Hp, Wp)
    results = postprocess_batch(
        pred_logits=out["pred_logits"], pred_masks=out["pred_masks"],
        input_sizes=[(h, w), ...], output_sizes=[(H, W), ...],
        isthing=[c.isthing for c in cfg.categories],
        category_ids=[c.id for c in cfg.categories])
    seg, segments_info = results[0]["panoptic_seg"]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Size = tuple[int, int]


def panoptic_inference(
    *,
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    isthing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    category_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Merge per-query masks into one non-overlapping panoptic id map.

    Args:
        mask_cls: (Q, K + 1) class logits; the last column is "no object".
        mask_pred: (Q, H, W) mask logits, already at the output resolution.
        isthing: K flags, True for thing classes (one segment per query), False for stuff
            (all queries of one stuff class share a segment).
        object_mask_threshold: keep a query only if its best class probability is above this.
        overlap_threshold: drop a query whose argmax-won area is below this share of its own
            mask (mask prob >= 0.5).
        category_ids: K dataset ids written as `category_id`; default: the contiguous index.

    Returns:
        panoptic_seg: (H, W) int32, 0 = void, segments numbered 1..N in query order.
        segments_info: N dicts with id, category_id, isthing, score (the best class
            probability; the maximum over merged stuff queries), area (pixels) and bbox
            [x, y, w, h] (tight box, COCO panoptic convention), all plain Python values.
    """
    num_classes = mask_cls.shape[-1] - 1
    _check_label_space(num_classes=num_classes, isthing=isthing, category_ids=category_ids)
    if mask_pred.shape[0] != mask_cls.shape[0]:
        raise ValueError(f"mask_cls has {mask_cls.shape[0]} queries but mask_pred has "
                         f"{mask_pred.shape[0]}; pass the outputs of the same model call")
    mask_cls, mask_pred = mask_cls.float(), mask_pred.float()
    height, width = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device)

    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    if not bool(keep.any()):
        return panoptic_seg, []
    scores, labels = scores[keep], labels[keep]
    probs = mask_pred[keep].sigmoid()  # (N, H, W)
    n = probs.shape[0]

    winner = (scores.view(-1, 1, 1) * probs).argmax(0)  # (H, W), first index on ties
    own = probs >= 0.5  # (N, H, W)
    # A pixel belongs to its winning query only where that query's own mask covers it.
    covered = own.gather(0, winner.unsqueeze(0)).squeeze(0)  # (H, W)
    won_area = torch.bincount(winner.flatten(), minlength=n)
    kept_area = torch.bincount(winner[covered], minlength=n)
    own_area = own.flatten(1).sum(1)

    # The decisions need only N numbers per query, so they run on the CPU in Python.
    segment_of_query = [0] * n
    stuff_segment: dict[int, int] = {}
    seg_label: list[int] = []
    seg_score: list[float] = []
    for k, (label, score, won, kept, orig) in enumerate(zip(
            labels.tolist(), scores.tolist(), won_area.tolist(), kept_area.tolist(),
            own_area.tolist())):
        if won == 0 or orig == 0 or kept == 0 or won / orig < overlap_threshold:
            continue
        if not isthing[label] and label in stuff_segment:
            seg = stuff_segment[label]
            seg_score[seg - 1] = max(seg_score[seg - 1], score)
        else:
            seg_label.append(label)
            seg_score.append(score)
            seg = len(seg_label)
            if not isthing[label]:
                stuff_segment[label] = seg
        segment_of_query[k] = seg

    lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=mask_pred.device)
    panoptic_seg = torch.where(covered, lookup[winner], panoptic_seg)
    areas, boxes = segment_areas_and_boxes(panoptic_seg, num_segments=len(seg_label))
    segments_info = [
        {
            "id": i + 1,
            "category_id": int(category_ids[label]) if category_ids is not None else label,
            "isthing": bool(isthing[label]),
            "score": float(score),
            "area": area,
            "bbox": box,
        }
        for i, (label, score, area, box) in enumerate(zip(seg_label, seg_score, areas, boxes))
    ]
    return panoptic_seg, segments_info


def segment_areas_and_boxes(
    panoptic_seg: torch.Tensor, *, num_segments: int
) -> tuple[list[int], list[list[int]]]:
    """Pixel count and tight [x, y, w, h] box of segments 1..num_segments in an (H, W) id map.

    One pass over the map (no per-segment masks); a segment with no pixels gets area 0 and
    box [0, 0, 0, 0].
    """
    height, width = panoptic_seg.shape
    ids = panoptic_seg.long()
    areas = torch.bincount(ids.flatten(), minlength=num_segments + 1)[1:num_segments + 1]
    rows = torch.zeros((num_segments + 1, height), dtype=torch.bool, device=ids.device)
    cols = torch.zeros((num_segments + 1, width), dtype=torch.bool, device=ids.device)
    ys = torch.arange(height, device=ids.device).view(-1, 1).expand(height, width)
    xs = torch.arange(width, device=ids.device).view(1, -1).expand(height, width)
    rows[ids, ys] = True  # (N + 1, H): segment s has a pixel in row y
    cols[ids, xs] = True  # (N + 1, W)
    y0, y1 = _first_last(rows[1:])
    x0, x1 = _first_last(cols[1:])
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1)
    boxes = torch.where((areas > 0).unsqueeze(1), boxes, torch.zeros_like(boxes))
    return areas.tolist(), boxes.tolist()


def _first_last(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) bool -> first and last True index per row (0 where a row has none)."""
    length = present.shape[1]
    idx = torch.arange(length, device=present.device)
    first = torch.where(present, idx, length).min(1).values
    last = torch.where(present, idx, -1).max(1).values
    return first.clamp(max=length - 1), last.clamp(min=0)


def semantic_inference(*, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores: (Q, K + 1) logits and (Q, H, W) mask logits -> (K, H, W).

    score[c, y, x] = sum over queries of P(class c | query) * sigmoid(mask[y, x]); the
    semantic label map is its argmax over c.
    """
    cls = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", cls, mask_pred.float().sigmoid())


def instance_topk(
    *, mask_cls: torch.Tensor, topk: int = 100, thing_only: Sequence[bool] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (query, class) pairs instance inference keeps, decided from class logits alone.

    Args:
        mask_cls: (Q, K + 1) class logits.
        topk: how many pairs to keep (at most Q * K), best class probability first.
        thing_only: K thing flags; when given, pairs of stuff classes are then dropped (the
            reference does this when panoptic output is on).

    Returns:
        scores (N,) class probabilities, labels (N,) contiguous classes, queries (N,) indices.
    """
    num_classes = mask_cls.shape[-1] - 1
    probs = F.softmax(mask_cls.float(), dim=-1)[:, :-1].flatten()  # (Q * K,)
    scores, flat = probs.topk(min(topk, probs.numel()), sorted=True)
    labels, queries = flat % num_classes, flat // num_classes
    if thing_only is not None:
        _check_label_space(num_classes=num_classes, isthing=thing_only, category_ids=None)
        things = torch.tensor(list(thing_only), dtype=torch.bool, device=labels.device)
        keep = things[labels]
        scores, labels, queries = scores[keep], labels[keep], queries[keep]
    return scores, labels, queries


def instance_inference(
    *,
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    topk: int = 100,
    thing_only: Sequence[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Top-k (query, class) pairs as instances with binary masks and mask-aware scores.

    Args:
        mask_cls: (Q, K + 1) class logits.
        mask_pred: (Q, H, W) mask logits at the output resolution.
        topk, thing_only: as in `instance_topk`.

    Returns:
        masks (N, H, W) bool (logit > 0), scores (N,) = class probability * mean mask
        probability inside the mask, labels (N,) contiguous classes, queries (N,).
    """
    scores, labels, queries = instance_topk(mask_cls=mask_cls, topk=topk, thing_only=thing_only)
    return _instances(scores=scores, labels=labels, queries=queries,
                      mask_logits=mask_pred.float()[queries])


def _instances(*, scores: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
               mask_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    masks = mask_logits > 0  # (N, H, W)
    inside = masks.flatten(1).float()
    mask_score = (mask_logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    return {"masks": masks, "scores": scores * mask_score, "labels": labels, "queries": queries}


def resize_masks(
    masks: torch.Tensor, *, padded_size: Size, input_size: Size, output_size: Size
) -> torch.Tensor:
    """Undo padding and resizing: (N, h, w) logits at 1/4 of the padded input -> (N, H, W).

    Upsamples bilinearly to `padded_size` (Hp, Wp), keeps the valid top-left `input_size`
    (h_in, w_in) region, and resizes that to `output_size` (the original image's H, W), as
    detectron2's `sem_seg_postprocess` does. Each mask is resized independently, so resizing a
    subset of queries gives exactly the rows of resizing all of them.
    """
    if input_size[0] > padded_size[0] or input_size[1] > padded_size[1]:
        raise ValueError(f"input size {tuple(input_size)} is larger than the padded size "
                         f"{tuple(padded_size)}; pass each image's size before padding")
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *output_size))
    x = F.interpolate(masks.unsqueeze(0), size=tuple(padded_size), mode="bilinear",
                      align_corners=False)
    x = x[:, :, : input_size[0], : input_size[1]]
    x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x.squeeze(0)


def postprocess_batch(
    *,
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    input_sizes: Sequence[Size],
    output_sizes: Sequence[Size] | None = None,
    isthing: Sequence[bool],
    category_ids: Sequence[int] | None = None,
    padded_size: Size | None = None,
    panoptic: bool = True,
    semantic: bool = False,
    instance: bool = False,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    topk_per_image: int = 100,
) -> list[dict[str, Any]]:
    """Post-process a batch of model outputs into per-image results at the original size.

    Args:
        pred_logits: (B, Q, K + 1) class logits.
        pred_masks: (B, Q, h, w) mask logits at 1/4 of the padded input.
        input_sizes: B (height, width) of each image inside the padded batch, before padding.
        output_sizes: B (height, width) to produce (the original images); default input_sizes.
        isthing, category_ids: the label space, K entries each (see `panoptic_inference`).
        padded_size: (Hp, Wp) of the padded batch; default (4 h, 4 w).
        panoptic, semantic, instance: which results to compute.
        object_mask_threshold, overlap_threshold: panoptic thresholds.
        topk_per_image: instance inference keeps this many (query, class) pairs.

    Returns:
        B dicts with "panoptic_seg": (id map (H, W) int32, segments_info), "sem_seg":
        (K, H, W) float scores, "instances": see `instance_inference` (thing classes only when
        panoptic is on), each present when asked for.
    """
    batch, _, h, w = pred_masks.shape
    if pred_logits.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(f"pred_logits {tuple(pred_logits.shape)} and pred_masks "
                         f"{tuple(pred_masks.shape)} disagree on batch size or query count")
    if output_sizes is None:
        output_sizes = input_sizes
    if len(input_sizes) != batch or len(output_sizes) != batch:
        raise ValueError(f"got {len(input_sizes)} input sizes and {len(output_sizes)} output "
                         f"sizes for a batch of {batch}; pass one (height, width) per image")
    padded = tuple(padded_size) if padded_size is not None else (4 * h, 4 * w)
    results = []
    for mask_cls, masks, in_size, out_size in zip(pred_logits, pred_masks, input_sizes,
                                                  output_sizes):
        resize = functools.partial(resize_masks, padded_size=padded, input_size=tuple(in_size),
                                   output_size=tuple(out_size))
        result: dict[str, Any] = {}
        full = resize(masks) if semantic else None  # all Q masks are needed only here
        if semantic:
            result["sem_seg"] = semantic_inference(mask_cls=mask_cls, mask_pred=full)
        if panoptic:
            result["panoptic_seg"] = _panoptic_resized(
                mask_cls=mask_cls, masks=masks, full=full, resize=resize, isthing=isthing,
                category_ids=category_ids, object_mask_threshold=object_mask_threshold,
                overlap_threshold=overlap_threshold)
        if instance:
            scores, labels, queries = instance_topk(
                mask_cls=mask_cls, topk=topk_per_image, thing_only=isthing if panoptic else None)
            if full is not None:
                logits = full.float()[queries]
            else:
                unique, inverse = torch.unique(queries, return_inverse=True)
                logits = resize(masks[unique]).float()[inverse]
            result["instances"] = _instances(scores=scores, labels=labels, queries=queries,
                                             mask_logits=logits)
        results.append(result)
    return results


def _panoptic_resized(
    *,
    mask_cls: torch.Tensor,
    masks: torch.Tensor,
    full: torch.Tensor | None,
    resize: Callable[[torch.Tensor], torch.Tensor],
    isthing: Sequence[bool],
    category_ids: Sequence[int] | None,
    object_mask_threshold: float,
    overlap_threshold: float,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Panoptic inference that resizes only the queries that can survive the class filter."""
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls.float(), dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    # Dropped queries never influence the result, so leaving them out changes nothing.
    kept_masks = full[keep] if full is not None else resize(masks[keep])
    return panoptic_inference(
        mask_cls=mask_cls[keep], mask_pred=kept_masks, isthing=isthing,
        object_mask_threshold=object_mask_threshold, overlap_threshold=overlap_threshold,
        category_ids=category_ids)


def _check_label_space(*, num_classes: int, isthing: Sequence[bool],
                       category_ids: Sequence[int] | None) -> None:
    if len(isthing) != num_classes:
        raise ValueError(f"isthing has {len(isthing)} entries but the model predicts "
                         f"{num_classes} classes; pass one flag per class of the model's config")
    if category_ids is not None and len(category_ids) != num_classes:
        raise ValueError(f"category_ids has {len(category_ids)} entries but the model predicts "
                         f"{num_classes} classes; pass one dataset id per class")
