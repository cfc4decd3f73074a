"""decode_image / decode_batch: an awkward input becomes an upright RGB array or a clear error."""

from __future__ import annotations

import io

import bad_inputs
import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.segment.decode import (
    DecodeError,
    decode_batch,
    decode_image,
    resize_image,
    resized_size,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    expected = bad_inputs.make_bad_inputs(root)
    return {name: ((root / name).read_bytes(), status) for name, status in expected.items()}


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(bad_inputs.EXPECTED_ERROR_WORDS))
def test_bad_input_becomes_a_readable_error(corpus, name):
    data, status = corpus[name]
    assert status == "error"
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert bad_inputs.EXPECTED_ERROR_WORDS[name] in str(info.value)


def test_every_corpus_file_decodes_to_its_expected_status(corpus):
    batch = {"data": [data for data, _ in corpus.values()]}
    out = decode_batch(batch)
    assert out["status"] == [status for _, status in corpus.values()]
    for image, status, err in zip(out["image"], out["status"], out["error"]):
        if status == "ok":
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert err is None
        else:
            assert image.shape == (0, 0, 3) and err


def test_bomb_is_rejected_from_the_header_with_its_size(corpus):
    with pytest.raises(DecodeError, match=r"too large: 2500000000 pixels.*--max-pixels"):
        decode_image(corpus["bomb.png"][0])
    # A header within Pillow's own limit but above ours: our check names the dimensions. The
    # body is 64 zero bytes, so reaching the decoder would say "truncated", not "too large".
    small_bomb = bad_inputs.png_header_only(width=3000, height=2000)
    with pytest.raises(DecodeError, match=r"3000 x 2000 pixels exceeds the limit of 1000000"):
        decode_image(small_bomb, max_pixels=1_000_000)


def test_a_limit_above_pillows_own_is_honoured():
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 100
        decoded = decode_image(_encode(Image.new("RGB", (30, 20)), "PNG"), max_pixels=1000)
        assert (decoded.width, decoded.height) == (30, 20)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_truncated_images_fail_even_if_another_library_allowed_them(corpus):
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(DecodeError, match="truncated"):
            decode_image(corpus["truncated.jpg"][0])
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_one_pixel_image(corpus):
    decoded = decode_image(corpus["one_pixel.png"][0])
    assert decoded.array.tolist() == [[[10, 20, 30]]]


def test_cmyk_jpeg_keeps_its_colour(corpus):
    pixel = decode_image(corpus["cmyk.jpg"][0]).array[8, 8].astype(int)
    assert np.abs(pixel - np.array(bad_inputs.RED)).max() < 20


def test_16_bit_png_is_scaled_not_clipped(corpus):
    decoded = decode_image(corpus["gray16.png"][0])
    expected = np.round(bad_inputs.gray16_ramp()[0] / 257.0)
    row = decoded.array[0, :, 0].astype(int)
    assert np.abs(row - expected).max() <= 1
    assert len(set(row.tolist())) == 32  # clipping would flatten most of the ramp to 255
    assert (decoded.array[..., 0] == decoded.array[..., 2]).all()


def test_rgba_is_composited_over_white(corpus):
    array = decode_image(corpus["rgba.png"][0]).array
    assert array[5, 2].tolist() == list(bad_inputs.RED)
    assert array[5, 15].tolist() == [255, 255, 255]


def test_palette_transparency_is_composited_over_white(corpus):
    array = decode_image(corpus["palette.png"][0]).array
    assert array[5, 2].tolist() == [255, 255, 255]
    assert array[5, 15].tolist() == [0, 255, 0]


def test_exif_orientation_turns_the_image_upright(corpus):
    decoded = decode_image(corpus["exif_rotated.jpg"][0])
    assert (decoded.width, decoded.height) == bad_inputs.EXIF_UPRIGHT_SIZE
    top, bottom = decoded.array[5, 30].astype(int), decoded.array[-5, 30].astype(int)
    assert np.abs(top - bad_inputs.RED).max() < 30
    assert np.abs(bottom - bad_inputs.BLUE).max() < 30
    raw = decode_image(corpus["exif_rotated.jpg"][0], apply_exif=False)
    assert (raw.width, raw.height) == bad_inputs.EXIF_UPRIGHT_SIZE[::-1]


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
     ("RGB", "WEBP"), ("RGB", "GIF"), ("RGB", "BMP"), ("RGB", "TIFF")],
)
def test_other_modes_and_formats_become_rgb_uint8(mode, fmt):
    rgb = np.zeros((12, 16, 3), dtype=np.uint8)
    rgb[:, 8:] = 255
    im = Image.fromarray(rgb).convert(mode)
    if mode == "F":  # floats in 0..1, the common convention for float images
        im = Image.fromarray(np.asarray(im, dtype=np.float32) / 255.0)
    decoded = decode_image(_encode(im, fmt))
    assert decoded.array.shape == (12, 16, 3) and decoded.array.dtype == np.uint8
    assert decoded.array[:, :8].max() < 30 and decoded.array[:, 8:].min() > 225


def test_resize_to_the_test_size_keeps_the_original_size():
    data = _encode(Image.new("RGB", (400, 100), (1, 2, 3)), "PNG")
    decoded = decode_image(data, target_short_side=50, max_long_side=150)
    assert (decoded.width, decoded.height) == (400, 100)
    assert decoded.array.shape == (38, 150, 3)  # long side capped: 100 * 150 / 400 = 37.5
    assert resized_size(width=300, height=600, short_side=800, max_long_side=1333) == (667, 1333)
    assert resized_size(width=640, height=480, short_side=800, max_long_side=1333) == (1067, 800)


@pytest.mark.parametrize("short_side, max_long_side", [(50, 150), (200, 333), (None, 40)])
def test_resize_image_is_the_resize_of_decode_image(short_side, max_long_side):
    """The predictor's resize (of a decoded photo) and the decoder's resize are one arithmetic:
    Pillow's bilinear to `resized_size`, shrinking and enlarging."""
    rng = np.random.default_rng(3)
    photo = np.kron(rng.integers(0, 256, (13, 31, 3), dtype=np.uint8),
                    np.ones((8, 8, 1), dtype=np.uint8))[:100, :240]
    data = _encode(Image.fromarray(photo), "PNG")
    resized = resize_image(decode_image(data).array, short_side=short_side,
                           max_long_side=max_long_side)
    size = resized_size(width=240, height=100, short_side=short_side, max_long_side=max_long_side)
    assert resized.shape == (size[1], size[0], 3) and resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, decode_image(
        data, target_short_side=short_side, max_long_side=max_long_side).array)
    np.testing.assert_array_equal(resized, np.asarray(
        Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR)))
    assert resize_image(photo, short_side=100, max_long_side=None) is photo  # already that size


def test_batch_passes_source_errors_through_and_never_raises():
    good = _encode(Image.new("RGB", (4, 3), (9, 9, 9)), "PNG")
    batch = {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "data": np.array([good, None, good], dtype=object),
        "error": [None, None, "tar member could not be read"],
    }
    out = decode_batch(batch)
    assert out["status"] == ["ok", "error", "error"]
    assert out["error"][2] == "tar member could not be read"
    assert "empty" in out["error"][1]
    assert (out["width"], out["height"]) == ([4, None, None], [3, None, None])
    assert "data" not in out and list(out["image_id"]) == ["a", "b", "c"]


def test_batch_reads_null_errors_the_way_columnar_batches_hold_them():
    good = _encode(Image.new("RGB", (4, 3)), "PNG")
    batch = {"data": [good, good], "error": np.array([np.nan, np.nan], dtype=np.float32)}
    assert decode_batch(batch)["status"] == ["ok", "ok"]


def test_decode_batch_runs_in_ray_data_map_batches(ray_local, corpus):
    items = [{"image_id": name, "data": data, "error": None} for name, (data, _) in corpus.items()]
    ds = ray_local.data.from_items(items).map_batches(
        decode_batch, fn_kwargs={"target_short_side": 32, "max_long_side": 64}, batch_size=4
    )
    rows = {row["image_id"]: row for row in ds.take_all()}
    assert {name: row["status"] for name, row in rows.items()} == {
        name: status for name, (_, status) in corpus.items()
    }
    rotated = rows["exif_rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == bad_inputs.EXIF_UPRIGHT_SIZE
    assert rotated["image"].shape == (32, 48, 3)
    assert rows["empty.jpg"]["width"] is None and "empty" in rows["empty.jpg"]["error"]


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode_to_their_pixels(fmt):
    import pillow_heif

    pillow_heif.register_heif_opener()  # for the encoder; the decoder registers on its own
    rgb = np.zeros((48, 80, 3), np.uint8)
    rgb[:, :40] = (200, 30, 30)
    rgb[:, 40:] = (20, 180, 40)
    data = _encode(Image.fromarray(rgb), fmt, quality=95)
    out = decode_image(data)
    assert (out.width, out.height) == (80, 48) and out.array.shape == (48, 80, 3)
    assert np.abs(out.array.astype(int) - rgb).mean() < 8  # lossy, but the same picture
