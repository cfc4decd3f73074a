"""PanopticPredictor works without Ray and batches mixed sizes without changing results."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from model.config import get_config
from model.mask2former import build_model
from pipeline.segment.predictor import PanopticPredictor, plan_batches


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    config = get_config("tiny")
    # keep every query so random weights still produce segments to compare
    config = dataclasses.replace(config, inference=dataclasses.replace(
        config.inference, object_mask_threshold=0.0, overlap_threshold=0.0))
    return PanopticPredictor(model=build_model(config), batch_size=3, threads=2)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        out.append(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w])
    return out


def test_plan_batches_covers_every_image_once():
    sizes = [(64, 64), (70, 64), (64, 64), (100, 90), (64, 64), (64, 64), (33, 31)]
    batches = plan_batches(sizes, batch_size=2, divisibility=32)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(sizes)))
    assert all(1 <= len(b) <= 2 for b in batches)
    padded = [{((sizes[i][0] + 31) // 32, (sizes[i][1] + 31) // 32) for i in b} for b in batches]
    assert all(len(p) == 1 for p in padded)  # never two canvases in one batch
    assert len(batches) == 5  # 4 x (64, 64) -> 2 batches; (70, 64), (100, 90), (33, 31) alone


def test_batched_results_match_each_image_alone(predictor):
    sizes = [(96, 128), (96, 128), (80, 120), (128, 96), (70, 100)]
    images = _images(sizes)
    outputs = [(h * 2, w * 2) for h, w in sizes]  # results come back at the original size
    batched = predictor.predict(images, output_sizes=outputs)
    assert len(batched) == len(images)
    agree = total = 0
    for image, out, (ids, segments) in zip(images, outputs, batched):
        assert ids.shape == out and ids.dtype == np.int32
        alone_ids, alone_segments = predictor.predict([image], output_sizes=[out])[0]
        # same panoptic map up to renumbering: compare the category of every pixel
        def cats(id_map, segs):
            lut = {s["id"]: s["category_id"] for s in segs}
            return np.vectorize(lambda i: lut.get(int(i), -1))(id_map)
        agree += int((cats(ids, segments) == cats(alone_ids, alone_segments)).sum())
        total += ids.size
        assert {s["id"] for s in segments} == set(np.unique(ids)) - {0}
    assert agree / total >= 0.995


def test_ray_data_batch_with_error_rows(predictor):
    images = _images([(64, 96), (64, 96)])
    batch = {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "status": np.array(["ok", "error", "ok"], dtype=object),
        "error": np.array([None, "not an image", None], dtype=object),
        "image": np.array([images[0], np.zeros((0, 0, 3), np.uint8), images[1]], dtype=object),
        "height": np.array([64, np.nan, 32]),
        "width": np.array([96, np.nan, 48]),
    }
    out = predictor(batch)
    assert "image" not in out
    assert list(out["status"]) == ["ok", "error", "ok"]
    ids0 = np.frombuffer(out["panoptic"][0], dtype=np.int32).reshape(64, 96)
    ids2 = np.frombuffer(out["panoptic"][2], dtype=np.int32).reshape(32, 48)
    assert {s["id"] for s in json.loads(out["segments"][2])} == set(np.unique(ids2)) - {0}
    assert ids0.any() or ids0.sum() == 0
    assert out["panoptic"][1] is None and out["segments"][1] is None
    assert out["error"][1] == "not an image"
