"""COCO panoptic PNG <-> id map helpers, and reading a panoptic JSON + PNG folder."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.coco.panoptic_io import (
    MAX_ID,
    decode_panoptic_png,
    encode_panoptic_png,
    id2rgb,
    load_coco_panoptic,
    read_panoptic_png,
    rgb2id,
    segment_stats,
)


def test_rgb2id_and_id2rgb_are_inverse_over_the_whole_id_range():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, MAX_ID + 1, size=(7, 9), dtype=np.int64)
    ids[0, :3] = [0, 1, MAX_ID]
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (7, 9, 3)
    assert np.array_equal(rgb2id(rgb), ids)
    # the encoding is R + 256 G + 256^2 B
    assert rgb2id(np.array([1, 2, 3], dtype=np.uint8)) == 1 + 2 * 256 + 3 * 65536


def test_id2rgb_rejects_ids_a_png_cannot_hold():
    with pytest.raises(ValueError, match="renumber"):
        id2rgb(np.array([[MAX_ID + 1]]))
    with pytest.raises(ValueError):
        id2rgb(np.array([-1]))


def test_png_round_trip_is_lossless():
    rng = np.random.default_rng(1)
    ids = rng.choice([0, 5, 1000, 65537, MAX_ID], size=(31, 17)).astype(np.uint32)
    data = encode_panoptic_png(ids)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = decode_panoptic_png(data)
    assert decoded.dtype == np.uint32
    assert np.array_equal(decoded, ids)


def test_decode_rejects_a_grey_png_with_a_clear_error():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="RGB"):
        decode_panoptic_png(buf.getvalue())


def test_segment_stats_gives_area_and_coco_bbox():
    ids = np.zeros((6, 8), np.uint32)
    ids[1:3, 2:5] = 7  # rows 1-2, cols 2-4
    ids[5, 0] = 9
    ids[0, 7] = 7
    stats = segment_stats(ids)
    assert set(stats) == {7, 9}  # VOID (0) is not a segment
    assert stats[7] == (7, [2, 0, 6, 3])
    assert stats[9] == (1, [0, 5, 1, 1])


def test_real_coco_pngs_match_their_segments_info_exactly(coco_sample):
    data = load_coco_panoptic(str(coco_sample / "panoptic_examples.json"))
    assert len(data.categories) == 133 and len(data.annotations) == 2
    for image_id, ann in data.annotations.items():
        ids = read_panoptic_png(str(coco_sample / "panoptic" / ann["file_name"]))
        image = data.images[image_id]
        assert ids.shape == (image["height"], image["width"])
        stats = segment_stats(ids)
        info = {s["id"]: s for s in ann["segments_info"]}
        assert set(stats) == set(info)
        for seg_id, (area, bbox) in stats.items():
            assert area == info[seg_id]["area"]
            assert bbox == info[seg_id]["bbox"]


def test_load_coco_panoptic_indexes_by_image_and_category(tmp_path):
    doc = {
        "images": [{"id": "a", "file_name": "a.jpg", "height": 2, "width": 2}],
        "annotations": [{"image_id": "a", "file_name": "a.png", "segments_info": []}],
        "categories": [{"id": 3, "name": "x", "isthing": 1}],
    }
    (tmp_path / "p.json").write_text(json.dumps(doc))
    data = load_coco_panoptic(str(tmp_path / "p.json"))
    assert data.images["a"]["file_name"] == "a.jpg"
    assert data.annotations["a"]["file_name"] == "a.png"
    assert data.categories[3]["name"] == "x"
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_coco_panoptic(str(tmp_path / "bad.json"))


def test_reading_a_missing_png_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_panoptic_png(str(tmp_path / "nope.png"))
