"""`show` draws overlays of a segment output over the original images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from segment_helpers import tiny_bundle

from model.bundle import read_bundle_config
from pipeline.coco.panoptic_io import read_panoptic_png
from pipeline.segment.commits import OutputStore
from pipeline.segment.schema import encode_result, ok_row, to_table
from pipeline.segment.show import load_categories, show


def test_overlays_and_contact_sheet_from_output(coco_sample, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(coco_sample / "images", images)
    meta = json.loads((coco_sample / "panoptic_examples.json").read_text())
    cats_file = coco_sample / "panoptic_coco_categories.json"
    cats = {c["id"]: c for c in json.loads(cats_file.read_text())}
    rows = []
    for ann in meta["annotations"]:
        stem = ann["file_name"].rsplit(".", 1)[0]
        ids = read_panoptic_png(str(coco_sample / "panoptic" / ann["file_name"]))
        png, segments = encode_result(ids, [
            {"id": s["id"], "category_id": s["category_id"],
             "isthing": bool(cats[s["category_id"]]["isthing"]), "score": 1.0}
            for s in ann["segments_info"]])
        rows.append(ok_row(image_id=f"{stem}.jpg", image_uri=str(images / f"{stem}.jpg"),
                           shard="s", width=ids.shape[1], height=ids.shape[0],
                           panoptic_png=png, segments_info=segments, model_id="m@0"))
    OutputStore(str(tmp_path / "out")).commit_shard("s", to_table(rows))

    summary = show(str(tmp_path / "out"), str(tmp_path / "pics"), categories=str(cats_file))
    assert summary.skipped == [] and len(summary.written) == 2
    for uri, ann in zip(sorted(summary.written), sorted(meta["annotations"],
                                                         key=lambda a: a["file_name"])):
        picture = np.asarray(Image.open(uri))
        original = np.asarray(Image.open(images / ann["file_name"].replace(".png", ".jpg")))
        assert picture.shape == original.shape
        assert np.abs(picture.astype(int) - original).mean() > 5  # something was painted
    assert Image.open(summary.contact_sheet).size[0] > 0


def test_categories_come_from_the_bundle_door(tmp_path):
    bundle = tiny_bundle(str(tmp_path / "bundle"))
    cats = load_categories(model=bundle)
    expected = read_bundle_config(bundle).config.categories
    assert sorted(cats) == sorted(c.id for c in expected)
    first = expected[0]
    assert (cats[first.id]["name"], tuple(cats[first.id]["color"])) == (first.name, first.color)
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        load_categories(model=str(tmp_path / "nothing"))
