"""PQ of a segment output (Parquet rows) against COCO panoptic ground truth."""

from __future__ import annotations

import json

import pytest

from pipeline.coco.panoptic_io import read_panoptic_png
from pipeline.segment.commits import OutputStore
from pipeline.segment.output import evaluate_output
from pipeline.segment.schema import encode_result, ok_row, to_table


def _gt_as_output(coco_sample, dst, *, skip=()):
    meta = json.loads((coco_sample / "panoptic_examples.json").read_text())
    cats = {c["id"]: c for c in json.loads(
        (coco_sample / "panoptic_coco_categories.json").read_text())}
    rows = []
    for ann in meta["annotations"]:
        stem = ann["file_name"].rsplit(".", 1)[0]
        if stem in skip:
            continue
        ids = read_panoptic_png(str(coco_sample / "panoptic" / ann["file_name"]))
        segments = [{"id": s["id"], "category_id": s["category_id"],
                     "isthing": bool(cats[s["category_id"]]["isthing"]), "score": 1.0}
                    for s in ann["segments_info"]]
        png, segments = encode_result(ids, segments)
        rows.append(ok_row(image_id=f"shard.tar/{stem}", image_uri=f"s3://x/shard.tar#{stem}.jpg",
                           shard="shard.tar", width=ids.shape[1], height=ids.shape[0],
                           panoptic_png=png, segments_info=segments, model_id="m@0"))
    OutputStore(str(dst)).commit_shard("shard.tar", to_table(rows))


def test_ground_truth_as_output_scores_one(coco_sample, tmp_path):
    _gt_as_output(coco_sample, tmp_path / "out")
    ev = evaluate_output(str(tmp_path / "out"), str(coco_sample / "panoptic_examples.json"),
                         str(coco_sample / "panoptic"))
    assert ev.results["All"]["pq"] == pytest.approx(1.0)
    assert (ev.images_gt, ev.images_matched, ev.images_missing) == (2, 2, [])


def test_missing_images_count_as_empty_predictions(coco_sample, tmp_path):
    _gt_as_output(coco_sample, tmp_path / "out", skip={"000000142238"})
    ev = evaluate_output(str(tmp_path / "out"), str(coco_sample / "panoptic_examples.json"),
                         str(coco_sample / "panoptic"))
    assert ev.images_missing == ["000000142238"]
    assert 0.0 < ev.results["All"]["pq"] < 1.0
    assert "1 missing" in ev.render()


def test_no_output_says_so(coco_sample, tmp_path):
    with pytest.raises(FileNotFoundError, match="run `panoray segment` first"):
        evaluate_output(str(tmp_path / "nothing"), str(coco_sample / "panoptic_examples.json"))
