"""`show` draws overlays of a segment output over the original images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from segment_helpers import commit_ground_truth_as_output, tiny_bundle

from model.bundle import read_bundle_config
from pipeline.segment.show import load_categories, show


def test_overlays_and_contact_sheet_from_output(coco_sample, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(coco_sample / "images", images)
    cats_file, meta, cats, rows = commit_ground_truth_as_output(
        coco_sample, str(tmp_path / "out"), image_id=lambda stem: f"{stem}.jpg",
        image_uri=lambda stem: str(images / f"{stem}.jpg"))

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
