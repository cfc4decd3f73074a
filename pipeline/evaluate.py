"""Panoptic Quality (PQ, SQ, RQ) with panopticapi's semantics, on files at any URI.

The numbers are those of cocodataset/panopticapi ``evaluation.py``:

- segment ids come from the PNG colours (``id = R + 256 G + 256^2 B``), 0 is VOID;
- a ground-truth and a predicted segment of the same category match when
  IoU > 0.5, where the union leaves out the predicted pixels that fall on VOID;
- ground-truth segments with ``iscrowd == 1`` are never matched and never counted as false
  negatives; an unmatched prediction is not a false positive when more than half of its area
  lies on VOID or on the (last listed) crowd region of its category;
- ground-truth areas come from the JSON, predicted areas from the PNG;
- a prediction whose PNG and ``segments_info`` disagree, or with an unknown category, is an
  error; every ground-truth image needs a prediction;
- categories with no ground truth and no prediction (n == 0) are left out of the averages and
  get 0.0 in ``per_class``.

Differences, all where panopticapi would crash: an empty group (say, no stuff categories) gives
``n == 0`` and 0.0 metrics instead of ZeroDivisionError; a ground-truth segment without ``area``
takes its area from the PNG; ground truth and prediction of different sizes raise ValueError.

The work splits into a per-image :func:`pq_image_stat` returning a mergeable :class:`PQStat`
(per category: tp, fp, fn, IoU sum), a merge (``+=``) and :func:`pq_results`; the per-image step
runs serially, in a local process pool, or as Ray Data CPU tasks (``use_ray=True``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import numpy as np

from model.storage import join, split_endpoint
from pipeline.coco.panoptic_io import VOID, load_coco_panoptic, read_panoptic_png

logger = logging.getLogger(__name__)

OFFSET = 256 * 256 * 256  # gt_id * OFFSET + pred_id packs an id pair into one integer
_SERIAL_BELOW = 32  # fewer image pairs than this are not worth starting processes for


@dataclass
class PQStatCat:
    """Counts for one category: true positives, false positives, false negatives, IoU sum."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQStatCat) -> PQStatCat:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


@dataclass
class PQStat:
    """Per-category :class:`PQStatCat`; add two with ``+=`` (the merge is a plain sum)."""

    per_cat: dict[int, PQStatCat] = field(default_factory=dict)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.per_cat.setdefault(category_id, PQStatCat())

    def __iadd__(self, other: PQStat) -> PQStat:
        for category_id, stat in other.per_cat.items():
            mine = self[category_id]
            mine += stat
        return self

    def to_columns(self) -> dict[str, np.ndarray]:
        """Columns (one row per category): category_id, tp, fp, fn int64; iou float64."""
        cats = sorted(self.per_cat)
        return {
            "category_id": np.array(cats, dtype=np.int64),
            "tp": np.array([self.per_cat[c].tp for c in cats], dtype=np.int64),
            "fp": np.array([self.per_cat[c].fp for c in cats], dtype=np.int64),
            "fn": np.array([self.per_cat[c].fn for c in cats], dtype=np.int64),
            "iou": np.array([self.per_cat[c].iou for c in cats], dtype=np.float64),
        }

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence]) -> PQStat:
        """Inverse of :meth:`to_columns`; repeated category ids are summed."""
        stat = cls()
        for c, tp, fp, fn, iou in zip(
            columns["category_id"], columns["tp"], columns["fp"], columns["fn"], columns["iou"]
        ):
            stat += cls({int(c): PQStatCat(iou=float(iou), tp=int(tp), fp=int(fp), fn=int(fn))})
        return stat


def pq_image_stat(
    *,
    gt_segments: Iterable[Mapping[str, Any]],
    gt_ids: np.ndarray,
    pred_segments: Iterable[Mapping[str, Any]],
    pred_ids: np.ndarray,
    categories: Mapping[int, Any],
    image_id: Any = None,
) -> PQStat:
    """PQ counts for one image, from in-memory id maps and segment lists.

    gt_ids, pred_ids: (H, W) integer segment ids (0 = VOID), e.g. from ``decode_panoptic_png``.
    gt_segments, pred_segments: ``segments_info`` records (id, category_id; gt also iscrowd and
    area). categories: the category ids that exist (a dict keyed by id, or a set).
    image_id: only used in error messages. Inputs are not modified.
    """
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"image {image_id}: ground truth is {gt_ids.shape} but the prediction is "
            f"{pred_ids.shape} (H, W); predict at the ground truth's size"
        )
    gt_segms = {int(s["id"]): s for s in gt_segments}
    pred_segms = {int(s["id"]): s for s in pred_segments}

    # Predicted areas come from the PNG; PNG and JSON must list the same segments.
    pred_area: dict[int, int] = {}
    labels, counts = np.unique(pred_ids, return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise KeyError(
                f"image {image_id}: segment id {label} is in the predicted PNG but not in its "
                "segments_info; list every segment of the PNG in the JSON"
            )
        pred_area[label] = count
        if pred_segms[label]["category_id"] not in categories:
            raise KeyError(
                f"image {image_id}: predicted segment {label} has category_id "
                f"{pred_segms[label]['category_id']}, which the ground truth does not define; "
                "map predictions to the ground truth's categories"
            )
    missing = sorted(set(pred_segms) - set(pred_area))
    if missing:
        raise KeyError(
            f"image {image_id}: segment ids {missing} are in the predicted segments_info but "
            "not in its PNG; drop them from the JSON"
        )

    gt_area = {label: _gt_area(seg, label, gt_ids) for label, seg in gt_segms.items()}

    # Intersections of every (gt id, pred id) pair present in the image.
    pairs = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)
    pair_labels, pair_counts = np.unique(pairs, return_counts=True)
    inter = {
        (label // OFFSET, label % OFFSET): count
        for label, count in zip(pair_labels.tolist(), pair_counts.tolist())
    }

    stat = PQStat()
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (gt_label, pred_label), intersection in inter.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        gt_seg = gt_segms[gt_label]
        if gt_seg.get("iscrowd", 0) == 1:
            continue
        if gt_seg["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (
            pred_area[pred_label]
            + gt_area[gt_label]
            - intersection
            - inter.get((VOID, pred_label), 0)
        )
        iou = intersection / union
        if iou > 0.5:
            stat[gt_seg["category_id"]].tp += 1
            stat[gt_seg["category_id"]].iou += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd_by_cat: dict[int, int] = {}  # as panopticapi: the last crowd segment of a category
    for gt_label, gt_seg in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_seg.get("iscrowd", 0) == 1:
            crowd_by_cat[gt_seg["category_id"]] = gt_label
            continue
        stat[gt_seg["category_id"]].fn += 1

    for pred_label, pred_seg in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = inter.get((VOID, pred_label), 0)
        if pred_seg["category_id"] in crowd_by_cat:
            ignored += inter.get((crowd_by_cat[pred_seg["category_id"]], pred_label), 0)
        if ignored / pred_area[pred_label] > 0.5:
            continue
        stat[pred_seg["category_id"]].fp += 1
    return stat


def _gt_area(segment: Mapping[str, Any], label: int, gt_ids: np.ndarray) -> int:
    if "area" in segment:
        return segment["area"]
    return int(np.count_nonzero(gt_ids == label))


def pq_average(
    stat: PQStat, categories: Mapping[int, Mapping[str, Any]], *, isthing: bool | None
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Average PQ/SQ/RQ over the categories of one group (things, stuff, or all when None).

    Returns ({"pq", "sq", "rq", "n"}, {category_id: {"pq", "sq", "rq"}}); categories with no
    tp, fp or fn are left out of the average (n counts the others) and get zeros per class.
    """
    pq = sq = rq = 0.0
    n = 0
    per_class: dict[int, dict[str, float]] = {}
    for category_id, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        s = stat.per_cat.get(category_id, PQStatCat())
        if s.tp + s.fp + s.fn == 0:
            per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
        pq_c = s.iou / denominator
        sq_c = s.iou / s.tp if s.tp != 0 else 0.0
        rq_c = s.tp / denominator
        per_class[category_id] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
        pq += pq_c
        sq += sq_c
        rq += rq_c
    if n == 0:
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def pq_results(stat: PQStat, categories: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """panopticapi's result dict: {"All", "per_class", "Things", "Stuff"}.

    "All"/"Things"/"Stuff" each hold {"pq", "sq", "rq" (0..1), "n" (categories averaged)};
    "per_class" ({category_id: {"pq", "sq", "rq"}}) comes from "All", as in panopticapi.
    """
    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = pq_average(stat, categories, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def format_pq_table(result: Mapping[str, Any]) -> str:
    """panopticapi's summary table (PQ, SQ, RQ in percent, N categories) as text."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N")]
    lines.append("-" * (10 + 7 * 4))
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append(
            "{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
                name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]
            )
        )
    return "\n".join(lines)


def pq_stat_for_pairs(
    pairs: Sequence[tuple[Mapping, Mapping]],
    *,
    gt_folder: str,
    pred_folder: str,
    categories: Mapping[int, Any],
) -> PQStat:
    """Summed counts over (gt annotation, pred annotation) pairs whose PNGs are in the folders."""
    stat = PQStat()
    for gt_ann, pred_ann in pairs:
        stat += pq_image_stat(
            gt_segments=gt_ann["segments_info"],
            gt_ids=read_panoptic_png(join(gt_folder, gt_ann["file_name"])),
            pred_segments=pred_ann["segments_info"],
            pred_ids=read_panoptic_png(join(pred_folder, pred_ann["file_name"])),
            categories=categories,
            image_id=gt_ann["image_id"],
        )
    return stat


def pq_compute(
    gt_json_file: str,
    pred_json_file: str,
    gt_folder: str | None = None,
    pred_folder: str | None = None,
    *,
    workers: int | None = None,
    use_ray: bool = False,
) -> dict[str, Any]:
    """PQ of the predictions against the ground truth; panopticapi's signature and result.

    JSON files and PNG folders may be at any URI; a folder defaults to its JSON's URI without
    ``.json``. workers: local processes (None: one per CPU for larger sets, 1: in this process);
    they are spawned, so a script calling this needs the ``if __name__ == "__main__":`` guard.
    use_ray: run the per-image step as Ray Data tasks instead (for large sets on a cluster).
    Returns the dict described in :func:`pq_results`.
    """
    gt = load_coco_panoptic(gt_json_file)
    pred = load_coco_panoptic(pred_json_file)
    gt_folder = gt_folder or _default_folder(gt_json_file)
    pred_folder = pred_folder or _default_folder(pred_json_file)
    pairs = []
    for image_id, gt_ann in gt.annotations.items():
        if image_id not in pred.annotations:
            raise KeyError(
                f"no prediction for the image with id {image_id!r}; the prediction JSON needs "
                "an annotation for every ground-truth image"
            )
        pairs.append((gt_ann, pred.annotations[image_id]))
    categories = {int(k): {"isthing": v["isthing"]} for k, v in gt.categories.items()}
    kwargs = dict(gt_folder=gt_folder, pred_folder=pred_folder, categories=categories)

    if use_ray:
        stat = _pq_stat_ray(pairs, **kwargs)
    else:
        if workers is None:
            workers = (os.cpu_count() or 1) if len(pairs) >= _SERIAL_BELOW else 1
        stat = _pq_stat_processes(pairs, workers=workers, **kwargs)
    results = pq_results(stat, gt.categories)
    logger.info("PQ of %d images:\n%s", len(pairs), format_pq_table(results))
    return results


def _default_folder(json_uri: str) -> str:
    clean, endpoint = split_endpoint(json_uri)
    if not clean.endswith(".json"):
        raise ValueError(
            f"cannot guess the PNG folder of {clean!r} (it does not end in .json); "
            "pass the folder explicitly"
        )
    folder = clean[: -len(".json")]
    return f"{folder}?{urlencode({'endpoint': endpoint})}" if endpoint else folder


def _pq_stat_processes(pairs: list, *, workers: int, **kwargs: Any) -> PQStat:
    if workers <= 1 or len(pairs) <= 1:
        return pq_stat_for_pairs(pairs, **kwargs)
    n_workers = min(workers, len(pairs))
    chunks = [pairs[i::n_workers] for i in range(n_workers)]
    stat = PQStat()
    # spawn: forking a process that runs threads (s3fs, Ray) can deadlock the child.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        for part in pool.map(_pq_stat_chunk, chunks, [kwargs] * len(chunks)):
            stat += part
    return stat


def _pq_stat_chunk(pairs: list, kwargs: dict) -> PQStat:
    return pq_stat_for_pairs(pairs, **kwargs)


def _pq_stat_ray(pairs: list, *, batch_size: int = 16, **kwargs: Any) -> PQStat:
    """The per-image step as Ray Data CPU tasks over the image pairs; merged here."""
    import ray.data

    # JSON text keeps the nested segments_info out of Arrow schema inference.
    items = [{"gt": json.dumps(g), "pred": json.dumps(p)} for g, p in pairs]
    stats = ray.data.from_items(items).map_batches(
        _pq_stat_batch, fn_kwargs=kwargs, batch_size=batch_size, batch_format="numpy"
    )
    total = PQStat()
    for columns in stats.iter_batches(batch_size=None, batch_format="numpy"):
        total += PQStat.from_columns(columns)
    return total


def _pq_stat_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    pairs = [(json.loads(g), json.loads(p)) for g, p in zip(batch["gt"], batch["pred"])]
    return pq_stat_for_pairs(pairs, **kwargs).to_columns()
