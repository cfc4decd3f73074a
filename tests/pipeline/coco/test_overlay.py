"""Overlay pictures paint each segment in its class colour over the real image."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pipeline.coco.overlay import contact_sheet, render_overlay
from pipeline.coco.panoptic_io import rgb2id


def _sample(coco_sample, stem="000000439180"):
    meta = json.loads((coco_sample / "panoptic_examples.json").read_text())
    ann = next(a for a in meta["annotations"] if a["file_name"] == f"{stem}.png")
    cats = {c["id"]: c for c in json.loads(
        (coco_sample / "panoptic_coco_categories.json").read_text())}
    image = np.asarray(Image.open(coco_sample / "images" / f"{stem}.jpg").convert("RGB"))
    ids = rgb2id(np.asarray(Image.open(coco_sample / "panoptic" / f"{stem}.png").convert("RGB")))
    return image, ids, ann["segments_info"], cats


def test_segments_take_their_class_colour_and_void_stays(coco_sample):
    image, ids, segments, cats = _sample(coco_sample)
    out = np.asarray(render_overlay(image, ids, segments, cats, labels=False)).astype(int)
    assert out.shape == image.shape
    for seg in segments:
        inside = ids == seg["id"]
        # interior pixels (not boundaries) move towards the class colour
        interior = inside.copy()
        interior[1:, :] &= inside[:-1, :]
        interior[:, 1:] &= inside[:, :-1]
        interior[:-1, :] &= inside[1:, :]
        interior[:, :-1] &= inside[:, 1:]
        if interior.sum() < 100 or seg.get("isthing"):
            continue
        color = np.array(cats[seg["category_id"]]["color"])
        before = np.abs(image[interior].astype(int) - color).mean()
        after = np.abs(out[interior] - color).mean()
        assert after < before * 0.6, seg
    void = ids == 0
    if void.any():
        edge_free = void.copy()
        edge_free[:-1, :] &= void[1:, :]
        edge_free[:, :-1] &= void[:, 1:]
        assert np.array_equal(out[edge_free], image[edge_free])


def test_labels_and_contact_sheet(coco_sample):
    image, ids, segments, cats = _sample(coco_sample)
    plain = render_overlay(image, ids, segments, cats, labels=False)
    labelled = render_overlay(image, ids, segments, cats, labels=True)
    assert np.asarray(plain).tolist() != np.asarray(labelled).tolist()
    sheet = contact_sheet([plain, labelled, plain], columns=2, thumb=128)
    assert sheet.size == (256, 256)
