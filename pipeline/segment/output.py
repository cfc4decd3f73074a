"""PQ of a segment job's Parquet output against COCO panoptic ground truth.

A row is matched to a ground-truth image by file-name stem: the last path component of the
row's ``image_uri`` (after ``#`` for archive members) without its extension, against the
``file_name`` stems in the ground-truth JSON. Ground-truth images with no ok row count as
predicted empty (every segment missed), so a job that lost or failed images scores lower, and
the counts say how many.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from model.storage import get_filesystem, join
from pipeline.coco.panoptic_io import decode_panoptic_png, load_coco_panoptic, read_panoptic_png
from pipeline.evaluate import PQStat, format_pq_table, pq_image_stat, pq_results

log = logging.getLogger(__name__)


@dataclass
class OutputEvaluation:
    results: dict[str, Any]  # panopticapi's result dict
    images_gt: int = 0
    images_matched: int = 0
    images_missing: list[str] = field(default_factory=list)  # gt stems with no ok row
    rows_unmatched: int = 0  # ok rows whose image is not in the ground truth

    def render(self) -> str:
        lines = [format_pq_table(self.results),
                 f"images: {self.images_matched} of {self.images_gt} ground-truth images "
                 f"predicted; {len(self.images_missing)} missing or failed (scored as empty); "
                 f"{self.rows_unmatched} output rows not in the ground truth"]
        return "\n".join(lines)


def _stem(uri: str) -> str:
    name = uri.rsplit("#", 1)[-1].rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def read_output_rows(output_uri: str, columns: list[str] | None = None) -> list[dict]:
    """Every committed row of a segment output (DST/data/*.parquet)."""
    fs, path = get_filesystem(join(output_uri, "data"))
    try:
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        files = []
    if not files:
        raise FileNotFoundError(f"no segment output under {output_uri}/data; run "
                                "`panoray segment` first")
    rows: list[dict] = []
    for p in files:
        with fs.open(p) as f:
            rows.extend(pq.read_table(f, columns=columns).to_pylist())
    return rows


def evaluate_output(output_uri: str, gt_json_uri: str, gt_folder: str | None = None
                    ) -> OutputEvaluation:
    """PQ of the ok rows under `output_uri` against the COCO panoptic ground truth."""
    gt = load_coco_panoptic(gt_json_uri)
    folder = gt_folder or (gt_json_uri[: -len(".json")] if gt_json_uri.endswith(".json")
                           else gt_json_uri)
    categories = {int(k): {"isthing": v["isthing"]} for k, v in gt.categories.items()}
    by_stem = {_stem(ann["file_name"]): ann for ann in gt.annotations.values()}
    rows = read_output_rows(output_uri, columns=["image_uri", "status", "panoptic_png",
                                                 "segments_info"])
    predicted = {}
    unmatched = 0
    for row in rows:
        if row["status"] != "ok":
            continue
        stem = _stem(row["image_uri"])
        if stem in by_stem:
            predicted[stem] = row
        else:
            unmatched += 1
    stat = PQStat()
    missing = []
    for stem, ann in sorted(by_stem.items()):
        gt_ids = read_panoptic_png(join(folder, ann["file_name"]))
        row = predicted.get(stem)
        if row is None:
            missing.append(stem)
            pred_ids, pred_segments = np.zeros_like(gt_ids), []
        else:
            pred_ids = decode_panoptic_png(row["panoptic_png"])
            pred_segments = row["segments_info"]
        stat += pq_image_stat(gt_segments=ann["segments_info"], gt_ids=gt_ids,
                              pred_segments=pred_segments, pred_ids=pred_ids,
                              categories=categories, image_id=stem)
    evaluation = OutputEvaluation(results=pq_results(stat, gt.categories),
                                  images_gt=len(by_stem), images_matched=len(predicted),
                                  images_missing=missing, rows_unmatched=unmatched)
    log.debug("PQ of %s:\n%s", output_uri, evaluation.render())
    return evaluation


def results_json(evaluation: OutputEvaluation) -> str:
    """The evaluation as JSON (for scripts and the demo's summary file)."""
    return json.dumps({"results": evaluation.results, "images_gt": evaluation.images_gt,
                       "images_matched": evaluation.images_matched,
                       "images_missing": evaluation.images_missing,
                       "rows_unmatched": evaluation.rows_unmatched}, indent=2, default=str)
