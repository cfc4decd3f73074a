"""Training data: split layout, LSJ geometry, mask/label alignment, crowd, determinism, S3."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from model.storage import get_filesystem
from pipeline.coco.panoptic_io import encode_panoptic_png
from pipeline.train.data import (
    IMAGE_PAD_VALUE,
    LSJConfig,
    epoch_order,
    example_at,
    load_split,
    make_example,
    to_model_inputs,
    train_dataset,
)

RED, BLUE, GREEN, YELLOW = (200, 30, 30), (30, 40, 210), (40, 190, 60), (230, 210, 20)
# segment id -> (colour, category id, iscrowd)
SEGMENTS = {11: (RED, 3, 0), 22: (BLUE, 7, 0), 33: (GREEN, 3, 1), 44: (YELLOW, 5, 0)}
CATEGORIES = [  # deliberately not sorted by id
    {"id": 7, "name": "sky", "isthing": 0, "color": [0, 0, 255]},
    {"id": 3, "name": "ball", "isthing": 1, "color": [255, 0, 0]},
    {"id": 5, "name": "box", "isthing": 1, "color": [255, 255, 0]},
]


def _quadrants(h: int, w: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of flat quadrants (+ a void stripe) and its segment ids."""
    ids = np.zeros((h, w), dtype=np.uint32)
    ids[: h // 2, : w // 2 + shift] = 11
    ids[: h // 2, w // 2 + shift:] = 22
    ids[h // 2:, : w // 2] = 33
    ids[h // 2:, w // 2:] = 44
    ids[h // 2 - 2: h // 2 + 2] = 0  # void
    rgb = np.full((h, w, 3), 0, dtype=np.uint8)
    for sid, (colour, _, _) in SEGMENTS.items():
        rgb[ids == sid] = colour
    return rgb, ids


def write_split(fs, root: str, *, num_images: int = 3, height: int = 60, width: int = 90) -> None:
    """A COCO panoptic split of flat-coloured quadrant images under `root` on `fs`."""
    images, annotations = [], []
    for folder in ("images", "panoptic"):
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
    for i in range(num_images):
        rgb, ids = _quadrants(height, width, shift=4 * i)
        name = f"{i + 1:04d}"
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")  # lossless, so colours are exact
        fs.pipe_file(f"{root}/images/{name}.png", buf.getvalue())
        fs.pipe_file(f"{root}/panoptic/{name}.png", encode_panoptic_png(ids))
        images.append({"id": i + 1, "file_name": f"{name}.png", "height": height, "width": width})
        annotations.append({"image_id": i + 1, "file_name": f"{name}.png", "segments_info": [
            {"id": sid, "category_id": cat, "iscrowd": crowd}
            for sid, (_, cat, crowd) in SEGMENTS.items()]})
    doc = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    fs.pipe_file(f"{root}/panoptic.json", json.dumps(doc).encode())


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    fs, path = get_filesystem(str(root))
    write_split(fs, path)
    return load_split(str(root))


def test_label_space_is_sorted_by_category_id_and_crowd_has_no_label(split):
    assert [c.id for c in split.categories] == [3, 5, 7]
    record = split.records[0]
    by_segment = dict(zip(record.segment_ids, record.labels))
    assert by_segment == {11: 0, 22: 2, 33: -1, 44: 1}
    assert record.image_uri.endswith("images/0001.png")


def test_category_order_can_follow_a_bundle(tmp_path, split):
    reordered = load_split(split.uri, category_order=[7, 3, 5])
    assert [c.name for c in reordered.categories] == ["sky", "ball", "box"]
    assert dict(zip(reordered.records[0].segment_ids, reordered.records[0].labels))[22] == 0
    with pytest.raises(ValueError, match="does not list the categories"):
        load_split(split.uri, category_order=[3, 5])


@pytest.mark.parametrize("crop", [48, 96])
def test_lsj_output_has_the_crop_size(split, crop):
    lsj = LSJConfig(crop_size=crop, min_scale=0.1, max_scale=2.0)
    for position in range(6):
        ex = example_at(split, position, lsj=lsj, seed=3)
        assert ex["image"].shape == (3, crop, crop) and ex["image"].dtype == np.uint8
        assert ex["segments"].shape == (crop, crop) and ex["segments"].dtype == np.uint16
        assert ex["segments"].max() == len(ex["labels"])


def test_masks_and_labels_stay_on_their_colours(split):
    """Every mask's inner pixels have its segment's colour, whatever flip, scale and crop."""
    colour_of_label = {0: RED, 2: BLUE, 1: YELLOW}
    lsj = LSJConfig(crop_size=64, min_scale=0.3, max_scale=2.0)
    checked = 0
    for position in range(24):
        ex = example_at(split, position, lsj=lsj, seed=0)
        image = ex["image"].transpose(1, 2, 0).astype(int)
        for k, label in enumerate(ex["labels"], start=1):
            inner = binary_erosion(ex["segments"] == k, iterations=2)
            if inner.sum() == 0:
                continue
            diff = np.abs(image[inner] - np.array(colour_of_label[int(label)])).max()
            assert diff <= 3, f"position {position}: segment of label {label} off by {diff}"
            checked += 1
        # The crowd (green) region and the padding belong to no segment.
        green = np.all(np.abs(image - np.array(GREEN)) <= 3, axis=-1)
        assert not (binary_erosion(green, iterations=2) & (ex["segments"] > 0)).any()
        pad = np.all(image == IMAGE_PAD_VALUE, axis=-1)
        assert not (binary_erosion(pad, iterations=1) & (ex["segments"] > 0)).any()
    assert checked > 24  # most examples showed several segments


def test_small_scales_pad_with_grey_and_no_segment(split):
    lsj = LSJConfig(crop_size=64, min_scale=0.25, max_scale=0.25)
    ex = example_at(split, 0, lsj=lsj, seed=0)
    # 60x90 scaled to fit 16x16 -> 11x16 in the top-left corner; the rest is padding.
    assert (ex["image"][:, 16:, :] == IMAGE_PAD_VALUE).all()
    assert (ex["image"][:, :, 16:] == IMAGE_PAD_VALUE).all()
    assert (ex["segments"][16:, :] == 0).all() and (ex["segments"][:, 16:] == 0).all()
    assert ex["segments"][:8, :16].any()


def test_flips_happen_and_follow_the_image(split):
    lsj = LSJConfig(crop_size=64, min_scale=1.0, max_scale=1.0)
    lefts = set()
    for epoch in range(8):
        ex = make_example(split.records[0], lsj=lsj, seed=0, epoch=epoch)
        image = ex["image"].transpose(1, 2, 0).astype(int)
        red_left = np.abs(image[10, 2] - np.array(RED)).max() <= 3
        lefts.add(bool(red_left))
        k_red = int(np.flatnonzero(ex["labels"] == 0)[0]) + 1
        assert (ex["segments"][10, 2] == k_red) == red_left
    assert lefts == {True, False}


def test_examples_are_a_function_of_seed_epoch_and_image(split):
    lsj = LSJConfig(crop_size=48)
    a = example_at(split, 4, lsj=lsj, seed=0)
    b = example_at(split, 4, lsj=lsj, seed=0)
    c = example_at(split, 4, lsj=lsj, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in ("image", "segments", "labels"))
    assert a["sample_seed"] == b["sample_seed"] != c["sample_seed"]
    same_image = make_example(split.records[int(epoch_order(0, 1, 3)[1])], lsj=lsj, seed=0,
                              epoch=1)
    assert np.array_equal(a["image"], same_image["image"])
    assert not np.array_equal(a["image"], c["image"]) or a["image_id"] != c["image_id"]


def test_each_epoch_visits_every_image_once(split):
    lsj = LSJConfig(crop_size=32)
    for epoch in range(2):
        ids = [example_at(split, epoch * 3 + i, lsj=lsj, seed=5)["image_id"] for i in range(3)]
        assert sorted(ids) == ["1", "2", "3"]


def test_model_inputs_have_one_binary_mask_per_label(split):
    lsj = LSJConfig(crop_size=48)
    rows = [example_at(split, p, lsj=lsj, seed=0) for p in range(2)]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    images, targets = to_model_inputs(batch, size_divisibility=32)
    assert images.shape == (2, 3, 48, 48) and images.max() <= 255
    for row, target in zip(rows, targets):
        assert target["masks"].shape == (len(row["labels"]), 64, 64)
        assert target["masks"][:, 48:].sum() == 0
        assert target["masks"].sum(0).max() <= 1  # panoptic: no pixel in two masks
        for k in range(len(row["labels"])):
            assert np.array_equal(target["masks"][k, :48, :48].numpy(), row["segments"] == k + 1)


def test_ray_data_stream_matches_the_positions(split, ray_local):
    lsj = LSJConfig(crop_size=32)
    rows = train_dataset(split, lsj=lsj, seed=2, num_samples=5, start=3).take_all()
    assert sorted(int(r["position"]) for r in rows) == [3, 4, 5, 6, 7]
    for row in rows:
        expected = example_at(split, int(row["position"]), lsj=lsj, seed=2)
        assert np.array_equal(row["image"], expected["image"])
        assert np.array_equal(row["segments"], expected["segments"])
        assert list(row["labels"]) == list(expected["labels"])


def test_reads_a_split_from_s3(s3_bucket):
    fs, _ = get_filesystem(f"s3://{s3_bucket}")
    write_split(fs, f"{s3_bucket}/data/train", num_images=2)
    split = load_split(f"s3://{s3_bucket}/data/train")
    assert split.records[0].image_uri.startswith(f"s3://{s3_bucket}/data/train/images/")
    ex = example_at(split, 1, lsj=LSJConfig(crop_size=32), seed=0)
    assert ex["image"].shape == (3, 32, 32) and len(ex["labels"]) >= 1


def test_missing_layout_says_what_is_expected(tmp_path):
    (tmp_path / "panoptic.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="images/ and panoptic/"):
        load_split(str(tmp_path))
