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


def _plain_stats(ids: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """The statistics by definition, one segment at a time (the oracle)."""
    out = {}
    for seg_id in np.unique(ids):
        if seg_id == 0:
            continue
        ys, xs = np.nonzero(ids == seg_id)
        out[int(seg_id)] = (len(ys), [int(xs.min()), int(ys.min()),
                                      int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)])
    return out


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 13), (64, 48)])
def test_segment_stats_equal_the_plain_definition_on_random_maps(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(20):
        # Few ids in blocks (runs) and scattered pixels (split segments, runs of one).
        ids = rng.choice([0, 1, 2, 300, 70000], size=shape).astype(np.int32)
        if trial % 2:
            ids = np.repeat(ids[:, : max(1, shape[1] // 3)], 3, axis=1)[:, : shape[1]]
            ids = np.pad(ids, ((0, 0), (0, shape[1] - ids.shape[1])))
        assert segment_stats(ids) == _plain_stats(ids)


def test_segment_stats_of_an_all_void_map_is_empty():
    assert segment_stats(np.zeros((5, 4), np.int32)) == {}


def test_png_is_read_alike_by_pillow_and_by_our_decoder():
    # Pillow is an independent PNG decoder: what panopticapi and friends use.
    rng = np.random.default_rng(3)
    ids = np.repeat(rng.integers(0, 2**24, size=(20, 1)), 33, axis=1).astype(np.uint32)
    ids[::3, ::5] = 17
    data = encode_panoptic_png(ids)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB" and img.size == (33, 20)
        rgb = np.asarray(img).astype(np.uint32)
    assert np.array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], ids)


def test_encode_refuses_an_empty_map():
    with pytest.raises(ValueError, match="at least one pixel"):
        encode_panoptic_png(np.zeros((0, 4), np.int32))
