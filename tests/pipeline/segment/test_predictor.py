"""PanopticPredictor works without Ray and batches mixed sizes without changing results;
PredictStage runs any predictor that follows the contract on Ray Data batches."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import get_config
from model.mask2former import build_model
from model.postprocess import postprocess_batch
from pipeline.segment.decode import decode_image, resize_image, resized_size
from pipeline.segment.predictor import PanopticPredictor, plan_batches, resize_on_device
from pipeline.segment.rows import PredictStage


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    config = get_config("tiny")
    # keep every query so random weights still produce segments to compare; a small test size
    # keeps the CPU forward quick
    config = dataclasses.replace(config, inference=dataclasses.replace(
        config.inference, object_mask_threshold=0.0, overlap_threshold=0.0, min_size=64,
        max_size=128))
    return PanopticPredictor(model=build_model(config), batch_size=3, threads=2)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        out.append(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w])
    return out


def _categories(id_map, segments):
    """The category of every pixel of a panoptic map (-1: no segment)."""
    lut = {s["id"]: s["category_id"] for s in segments}
    return np.vectorize(lambda i: lut.get(int(i), -1))(id_map)


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
    # photos of any size: resized to the test size (short side 64, long side <= 128) inside
    sizes = [(192, 256), (96, 128), (80, 120), (256, 192), (35, 50), (64, 300)]
    images = _images(sizes)
    batched = predictor.predict(images)
    assert len(batched) == len(images)
    agree = total = 0
    for image, (ids, segments) in zip(images, batched):
        assert ids.shape == image.shape[:2] and ids.dtype == np.int32  # at the photo's size
        alone_ids, alone_segments = predictor.predict([image])[0]
        # same panoptic map up to renumbering: compare the category of every pixel
        agree += int((_categories(ids, segments)
                      == _categories(alone_ids, alone_segments)).sum())
        total += ids.size
        assert {s["id"] for s in segments} == set(np.unique(ids)) - {0}
    assert agree / total >= 0.995


def test_predict_resizes_as_the_decoder_did_and_answers_at_the_photo_size(predictor):
    """The oracle is the pre-contract path: the decoder resized to the test size, the model ran
    on that, post-processing brought the map back to the original size."""
    photo = _images([(90, 150)], seed=4)[0]
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    inference = predictor.config.inference
    small = decode_image(buf.getvalue(), target_short_side=inference.min_size,
                         max_long_side=inference.max_size).array
    assert small.shape == (64, 107, 3)
    x = torch.tensor(predictor.config.pixel_mean).view(1, 3, 1, 1).repeat(1, 1, 64, 128)
    x[0, :, :64, :107] = torch.from_numpy(small.copy()).permute(2, 0, 1)
    with torch.inference_mode():
        out = predictor.model(x, aux_outputs=False)
    [expected] = postprocess_batch(
        pred_logits=out["pred_logits"], pred_masks=out["pred_masks"], input_sizes=[(64, 107)],
        output_sizes=[(90, 150)], padded_size=(64, 128), isthing=predictor.isthing,
        category_ids=predictor.category_ids,
        object_mask_threshold=inference.object_mask_threshold,
        overlap_threshold=inference.overlap_threshold)
    [(ids, segments)] = predictor.predict([photo])
    assert ids.shape == (90, 150)
    np.testing.assert_array_equal(ids, expected["panoptic_seg"][0].numpy())
    assert segments == expected["panoptic_seg"][1]


@pytest.mark.parametrize("size", [(480, 640), (1200, 1600), (300, 200), (64, 64)])
def test_the_device_resize_is_within_one_level_of_pillows(size):
    """resize_on_device (what a GPU predictor runs on its device) against the host resize it
    replaces there: the same antialiased bilinear filter, so pixels differ by rounding only."""
    rng = np.random.default_rng(1)
    h, w = size
    blocks = np.kron(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))
    photo = np.clip(blocks[:h, :w] + rng.integers(-25, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    for short, longest in [(800, 1333), (384, 384), (64, 128)]:
        expected = resize_image(photo, short_side=short, max_long_side=longest)
        tw, th = resized_size(width=w, height=h, short_side=short, max_long_side=longest)
        got = resize_on_device(torch.from_numpy(photo), (th, tw))
        assert got.dtype == torch.float32 and tuple(got.shape) == (3, th, tw)
        diff = np.abs(got.permute(1, 2, 0).numpy() - expected.astype(np.float32))
        assert diff.max() <= 1.0, (size, short, diff.max())
        assert diff.mean() < 0.3
        assert np.array_equal(got.numpy(), np.round(got.numpy()))  # whole levels, as uint8


def test_predict_with_the_device_resize_answers_as_the_host_resize(predictor):
    """The GPU's input path (originals to the device, resized there), run on the CPU: the same
    segments as the host-resized path, up to the one-level pixel differences."""
    on_device = PanopticPredictor(model=predictor.model, batch_size=3, device_resize=True)
    assert not predictor.device_resize and on_device.device_resize  # CPU default: Pillow
    images = _images([(192, 256), (96, 128), (35, 50), (64, 300), (64, 107)], seed=7)
    agree = total = 0
    for (ids, segs), (ref_ids, ref_segs) in zip(on_device.predict(images),
                                                predictor.predict(images)):
        assert ids.shape == ref_ids.shape and ids.dtype == np.int32
        assert {s["id"] for s in segs} == set(np.unique(ids)) - {0}
        agree += int((_categories(ids, segs) == _categories(ref_ids, ref_segs)).sum())
        total += ids.size
    assert agree / total >= 0.97


def test_predict_says_what_it_takes(predictor):
    with pytest.raises(ValueError, match=r"image 1 is a float32 array .* uint8 RGB"):
        predictor.predict([_images([(40, 40)])[0], np.zeros((40, 40, 3), np.float32)])
    with pytest.raises(ValueError, match=r"image 0 is a uint8 array of shape \(40, 40\)"):
        predictor.predict([np.zeros((40, 40), np.uint8)])


def test_ray_data_batch_with_error_rows(predictor):
    images = _images([(64, 96), (32, 48)])  # decoded photos at their original size
    batch = {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "status": np.array(["ok", "error", "ok"], dtype=object),
        "error": np.array([None, "not an image", None], dtype=object),
        "image": np.array([images[0], np.zeros((0, 0, 3), np.uint8), images[1]], dtype=object),
        "height": np.array([64, np.nan, 32]),
        "width": np.array([96, np.nan, 48]),
    }
    out = PredictStage.wrapping(predictor)(batch)
    assert "image" not in out
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["panoptic_dtype"][0] == "uint8"  # a few segments: one byte a pixel
    ids0 = np.frombuffer(out["panoptic"][0], dtype=out["panoptic_dtype"][0]).reshape(64, 96)
    ids2 = np.frombuffer(out["panoptic"][2], dtype=out["panoptic_dtype"][2]).reshape(32, 48)
    assert {s["id"] for s in json.loads(out["segments"][2])} == set(np.unique(ids2)) - {0}
    alone_ids, alone_segments = predictor.predict([images[1]])[0]
    np.testing.assert_array_equal(ids2, alone_ids)  # the original-size photo, resized inside
    batched_segments = json.loads(out["segments"][2])
    assert [s["category_id"] for s in batched_segments] == [
        s["category_id"] for s in alone_segments]
    # its batch-mate only reorders float sums
    assert [s["score"] for s in batched_segments] == pytest.approx(
        [s["score"] for s in alone_segments], abs=1e-5)
    assert ids0.any() or ids0.sum() == 0
    assert out["panoptic"][1] is None and out["segments"][1] is None
    assert out["error"][1] == "not an image"


def test_a_compiled_predictor_answers_as_the_eager_one(predictor):
    """`compile=` (segment --compile) runs the whole-graph compiled forward; aot_eager traces it
    as inductor would, without the minutes of code generation a CPU run of inductor takes."""
    compiled = PanopticPredictor(model=predictor.model, batch_size=3, compile="aot_eager")
    images = _images([(192, 256), (96, 128), (150, 200)], seed=11)  # one canvas: one compile
    for (ids, segs), (ref_ids, ref_segs) in zip(compiled.predict(images),
                                                predictor.predict(images)):
        np.testing.assert_array_equal(ids, ref_ids)
        assert [s["category_id"] for s in segs] == [s["category_id"] for s in ref_segs]


class _ThreadRecorder:
    """A predictor that notes the threads it is built and called in."""

    def __init__(self, model_uri, **options):
        import threading

        self.built_in = threading.get_ident()
        self.called_in: list[int] = []

    def predict(self, images):
        import threading

        self.called_in.append(threading.get_ident())
        return [(np.zeros(im.shape[:2], np.int32), []) for im in images]


def test_the_stage_calls_its_predictor_in_the_thread_that_built_it():
    """Ray Data builds a pool's callable in the actor's main thread and calls it from another.
    torch's OpenMP settings (set_num_threads) are per thread, and torch ops from a second thread
    ran the model at a third of its speed: the stage keeps the predictor in one thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stage = PredictStage(_ThreadRecorder, "none")
    assert stage.predictor.built_in != threading.get_ident()
    images = _images([(8, 8), (8, 12)])
    batch = {"image_id": np.array(["a", "b"], dtype=object),
             "status": np.array(["ok", "ok"], dtype=object),
             "error": np.array([None, None], dtype=object),
             "image": np.array([images[0], images[1], None], dtype=object)[:2],
             "height": np.array([8, 8]), "width": np.array([8, 12])}
    with ThreadPoolExecutor(1) as pool:  # as Ray Data calls it
        pool.submit(stage, dict(batch)).result()
    stage(dict(batch))
    assert stage.predictor.called_in == [stage.predictor.built_in] * 2
