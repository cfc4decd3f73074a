"""PQ of a segment job's Parquet output against COCO panoptic ground truth.

A row is matched to a ground-truth image by file-name stem: the last path component of the
row's ``image_uri`` (after ``#`` for archive members) without its extension, against the
``file_name`` stems in the ground-truth JSON. Ground-truth images with no ok row count as
predicted empty (every segment missed), so a job that lost or failed images scores lower, and
the counts say how many.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from model.storage import get_filesystem, join
from pipeline.coco.panoptic_io import decode_panoptic_png, load_coco_panoptic, read_panoptic_png
from pipeline.evaluate import PQStat, format_pq_table, pq_image_stat, pq_results
from pipeline.progress import Progress
from pipeline.segment.shards import IMAGE_EXTENSIONS

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


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_CHARS = 96  # of the readable part of a file name; the hash keeps names unique


def image_file_stem(image_id: str) -> str:
    """A file name (without extension) for what is written per row: unique per image_id and
    the same on every run, safe on any filesystem or object store.

    The image_id made readable (``/`` -> ``__``, other characters outside ``A-Za-z0-9._-`` ->
    ``_``, an image extension of its last part dropped, at most 96 characters from its end),
    then ``-`` and 10 hex digits of the image_id's SHA-1: ``shard-0001.tar/000000139`` ->
    ``shard-0001.tar__000000139-<hash>``; ``a/b.jpg`` and ``a__b.jpg`` stay apart.
    """
    digest = hashlib.sha1(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    head, _, last = image_id.rpartition("/")
    base, dot, ext = last.rpartition(".")
    if dot and base and ext.lower() in IMAGE_EXTENSIONS:
        last = base
    parts = [p for p in (*head.split("/"), last) if p]
    readable = "__".join(_UNSAFE.sub("_", p) for p in parts)[-_STEM_CHARS:].lstrip("._-")
    return f"{readable or 'image'}-{digest}"


def output_files(output_uri: str) -> tuple[Any, list[str]]:
    """(filesystem, sorted paths) of the committed Parquet files of a segment output."""
    fs, path = get_filesystem(join(output_uri, "data"))
    try:
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        files = []
    if not files:
        raise FileNotFoundError(f"no segment output under {output_uri}/data; run "
                                "`panoray segment` first")
    return fs, files


def iter_output_rows(output_uri: str, columns: list[str] | None = None, *,
                     batch_size: int = 64) -> Iterator[dict]:
    """Every committed row of a segment output, streamed (`batch_size` rows in memory), in a
    fixed order: files by name, rows as committed."""
    fs, files = output_files(output_uri)
    for p in files:
        with fs.open(p) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                yield from batch.to_pylist()


def read_output_rows(output_uri: str, columns: list[str] | None = None) -> list[dict]:
    """Every committed row of a segment output (DST/data/*.parquet)."""
    fs, files = output_files(output_uri)
    rows: list[dict] = []
    for p in files:
        with fs.open(p) as f:
            rows.extend(pq.read_table(f, columns=columns).to_pylist())
    return rows


def evaluate_output(output_uri: str, gt_json_uri: str, gt_folder: str | None = None, *,
                    progress: bool = True) -> OutputEvaluation:
    """PQ of the ok rows under `output_uri` against the COCO panoptic ground truth.
    `progress`: the images compared so far (`pipeline.progress`)."""
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
    meter = Progress("evaluate", total=len(by_stem), enabled=progress, log=log)
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
        meter.advance()
    meter.close()
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
