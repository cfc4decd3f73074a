"""The synthetic COCO-panoptic dataset: layout, determinism, JSON/PNG agreement, S3, PQ 1.0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.storage import get_filesystem
from pipeline.coco.panoptic_io import load_coco_panoptic, read_panoptic_png, segment_stats
from pipeline.coco.synth import SYNTH_CATEGORIES, make_synthetic_dataset
from pipeline.evaluate import pq_compute

SIZE = (96, 112)  # (H, W): not square, so a swapped axis shows


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(str(root), num_train=24, num_val=8, image_size=SIZE, seed=7)
    return root


def test_layout_is_coco_panoptic(dataset):
    for split, count in (("train", 24), ("val", 8)):
        doc = json.loads((dataset / split / "panoptic.json").read_text())
        assert doc["categories"] == SYNTH_CATEGORIES
        assert len(doc["images"]) == len(doc["annotations"]) == count
        for image, ann in zip(doc["images"], doc["annotations"]):
            assert ann["image_id"] == image["id"]
            assert (image["height"], image["width"]) == SIZE
            with Image.open(dataset / split / "images" / image["file_name"]) as img:
                assert img.format == "JPEG" and img.size == (SIZE[1], SIZE[0])
            assert (dataset / split / "panoptic" / ann["file_name"]).is_file()
        assert len(list((dataset / split / "images").iterdir())) == count


def test_segments_info_agrees_with_every_png(dataset):
    things = {c["id"] for c in SYNTH_CATEGORIES if c["isthing"]}
    seen: set[int] = set()
    for split in ("train", "val"):
        data = load_coco_panoptic(str(dataset / split / "panoptic.json"))
        for ann in data.annotations.values():
            ids = read_panoptic_png(str(dataset / split / "panoptic" / ann["file_name"]))
            assert ids.shape == SIZE
            assert not (ids == 0).any()  # every pixel is labelled
            stats = segment_stats(ids)
            info = {s["id"]: s for s in ann["segments_info"]}
            assert set(info) == set(stats)
            for seg_id, (area, bbox) in stats.items():
                assert (info[seg_id]["area"], info[seg_id]["bbox"]) == (area, bbox)
                assert info[seg_id]["iscrowd"] == 0
                assert info[seg_id]["category_id"] in data.categories
            cats = [s["category_id"] for s in ann["segments_info"]]
            n_things = sum(c in things for c in cats)
            assert 1 <= n_things <= 4
            assert len(cats) - n_things >= 1
            # instances are large enough to learn: none below 0.5% of the image
            for s in ann["segments_info"]:
                if s["category_id"] in things:
                    assert s["area"] >= 0.005 * SIZE[0] * SIZE[1]
            seen.update(cats)
    assert seen == {c["id"] for c in SYNTH_CATEGORIES}


def test_same_seed_same_bytes_other_seed_other_bytes(dataset, tmp_path):
    make_synthetic_dataset(str(tmp_path / "a"), num_train=24, num_val=8, image_size=SIZE, seed=7)
    assert all_files(tmp_path / "a") == all_files(dataset)
    make_synthetic_dataset(str(tmp_path / "b"), num_train=24, num_val=8, image_size=SIZE, seed=8)
    other = all_files(tmp_path / "b")
    assert other.keys() == all_files(dataset).keys()
    same = [name for name, data in other.items() if data == all_files(dataset)[name]]
    assert not [name for name in same if name.endswith((".jpg", ".png"))]


def test_train_and_val_share_no_image(dataset):
    train = {p.read_bytes() for p in (dataset / "train" / "images").iterdir()}
    val = {p.read_bytes() for p in (dataset / "val" / "images").iterdir()}
    assert len(train) == 24 and len(val) == 8
    assert not train & val


def test_ground_truth_against_itself_is_pq_one(dataset):
    gt_json = str(dataset / "val" / "panoptic.json")
    result = pq_compute(gt_json, gt_json)
    assert result["All"]["pq"] == 1.0
    assert result["All"]["n"] >= 6


def test_writes_to_s3(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/synth"
    summary = make_synthetic_dataset(uri, num_train=4, num_val=2, image_size=SIZE, seed=3)
    assert summary["splits"]["train"]["images"] == 4
    make_synthetic_dataset(str(tmp_path), num_train=4, num_val=2, image_size=SIZE, seed=3)
    fs, path = get_filesystem(uri)
    remote = sorted(fs.find(path))
    local = all_files(tmp_path)
    assert [p[len(path) + 1 :] for p in remote] == sorted(local)
    for p in remote:
        assert fs.cat_file(p) == local[p[len(path) + 1 :]]
    data = load_coco_panoptic(f"{uri}/val/panoptic.json")
    first = next(iter(data.annotations.values()))
    ids = read_panoptic_png(f"{uri}/val/panoptic/{first['file_name']}")
    assert set(segment_stats(ids)) == {s["id"] for s in first["segments_info"]}


def test_rejects_an_image_size_too_small_for_the_shapes(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        make_synthetic_dataset(str(tmp_path), num_train=1, num_val=1, image_size=(32, 32))


def _segment_colour_stats(root: Path, split: str) -> list[tuple[int, np.ndarray]]:
    """(category, mean and std of the segment's RGB pixels) for every segment of a split."""
    doc = json.loads((root / split / "panoptic.json").read_text())
    out = []
    for image, ann in zip(doc["images"], doc["annotations"]):
        with Image.open(root / split / "images" / image["file_name"]) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
        ids = read_panoptic_png(str(root / split / "panoptic" / ann["file_name"]))
        for s in ann["segments_info"]:
            pixels = rgb[ids == s["id"]]
            out.append((s["category_id"], np.concatenate([pixels.mean(0), pixels.std(0)])))
    return out


def test_classes_are_told_apart_by_colour_and_texture_alone(dataset):
    """A nearest-centroid rule on segment colour statistics, fit on train, mostly right on val.

    Shape is the stronger cue for things; this guards that appearance helps and stuff is easy.
    """
    train = _segment_colour_stats(dataset, "train")
    val = _segment_colour_stats(dataset, "val")
    centroids = {
        c: np.mean([f for k, f in train if k == c], axis=0) for c in {k for k, _ in train}
    }
    right = [min(centroids, key=lambda c: np.linalg.norm(f - centroids[c])) == k for k, f in val]
    assert np.mean(right) > 0.75
