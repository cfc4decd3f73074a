"""Image bytes -> upright RGB uint8 arrays, robustly: a bad image is an error value, never a crash.

Policy, in the order :func:`decode_image` applies it:

- **Size first.** The pixel count is checked from the header, before any pixel is decoded, so a
  decompression bomb (a tiny file claiming 50000 x 50000 pixels) costs nothing. Our limit
  (``max_pixels``) replaces Pillow's: Pillow's own ``DecompressionBombError`` becomes the same
  "image too large" error, its warning is silenced, and when a caller asks for a limit above
  Pillow's global ``Image.MAX_IMAGE_PIXELS`` that global is raised to match (never lowered).
- **Integrity.** Truncated files fail (``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept off; if some
  other library switched it on it is switched back, with one warning). PNG chunk checksums are
  verified, including the IDAT ones Pillow skips when decoding.
- **Orientation.** The EXIF orientation tag is applied (``apply_exif=False`` keeps the stored
  pixel order, e.g. to compare with annotations made on raw pixels). ``width`` and ``height``
  describe the upright image: output PNGs have that size.
- **Colour.** Every mode becomes RGB uint8. Transparency (RGBA, LA, palette with a transparent
  index) is composited over white, what most viewers show, so hidden colour values stored under
  transparent pixels never reach the model. 16-bit images are scaled (65535 -> 255), not clipped;
  32-bit integer and float images are scaled from their value range. CMYK is converted by Pillow
  without colour management (ICC profiles are ignored).
- **Resize** (optional): shorter side to ``target_short_side``, longer side capped at
  ``max_long_side``, bilinear, as Mask2Former's test-time resize does.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from pipeline.segment.shards import sniff_image_format

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: ~300 MB as RGB uint8
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Leading bytes of the formats people feed us, to name what a file claims to be in errors.
class DecodeError(ValueError):
    """An input that is not a usable image; the message says why, for a person to read."""


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image and the size it had before any resize."""

    array: np.ndarray  # (H', W', 3) uint8 RGB, resized when a target size was asked for
    width: int  # original width in pixels (after EXIF orientation, before resize)
    height: int  # original height in pixels


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_short_side: int | None = None,
    max_long_side: int | None = None,
    apply_exif: bool = True,
) -> DecodedImage:
    """Decode one encoded image (JPEG, PNG, WebP, BMP, TIFF, HEIC, AVIF; GIF: first frame) to
    RGB uint8.

    Raises :class:`DecodeError` with a readable message for anything that is not a whole,
    reasonably sized image. ``target_short_side`` / ``max_long_side`` (pixels) resize the returned
    array; ``width`` / ``height`` stay those of the original.
    """
    if data is None or len(data) == 0:
        raise DecodeError("not an image: the file is empty (0 bytes)")
    data = bytes(data)
    fmt = sniff_image_format(data)
    if fmt == "HEIF":
        _register_heif()
    _keep_truncated_images_failing()
    im = _open(data, fmt=fmt, max_pixels=max_pixels)
    fmt = im.format or fmt or "image"
    try:
        if fmt == "PNG":
            _verify_png(data)
        im.load()
        if apply_exif:
            im = _upright(im)
        rgb = _to_rgb(im)
    except DecodeError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise DecodeError(_describe_failure(e, fmt)) from None
    width, height = rgb.size
    array = resize_image(np.asarray(rgb, dtype=np.uint8), short_side=target_short_side,
                         max_long_side=max_long_side)
    return DecodedImage(array=array, width=width, height=height)


def resize_image(
    image: np.ndarray, *, short_side: int | None, max_long_side: int | None
) -> np.ndarray:
    """Mask2Former's test-time resize of an (H, W, 3) uint8 RGB array: bilinear (Pillow's, which
    antialiases when shrinking) to :func:`resized_size`. The array itself when the size is kept.

    The one resize of the test path: the predictor applies it to every photo, so the segment job,
    evaluation during training and a predictor called from Python see the same pixels.
    """
    height, width = image.shape[:2]
    size = resized_size(width=width, height=height, short_side=short_side,
                        max_long_side=max_long_side)
    if size == (width, height):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def resized_size(
    *, width: int, height: int, short_side: int | None, max_long_side: int | None
) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``short_side``, the longer one capped."""
    scale = 1.0 if short_side is None else short_side / min(width, height)
    if max_long_side is not None and max(width, height) * scale > max_long_side:
        scale = max_long_side / max(width, height)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def decode_batch(
    batch: Mapping[str, Any],
    *,
    data_column: str = "data",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_short_side: int | None = None,
    max_long_side: int | None = None,
    apply_exif: bool = True,
    keep_data: bool = False,
) -> dict[str, Any]:
    """Decode a Ray-Data-style batch (column name -> list or numpy array); never raises per image.

    Adds ``image`` ((H', W', 3) uint8 arrays; an empty (0, 0, 3) array on error), ``width`` and
    ``height`` (original size, None on error), ``status`` ("ok" / "error") and ``error`` (None when
    ok). A row whose ``error`` column is already set (a source that could not read it) stays an
    error without decoding. The encoded bytes are dropped unless ``keep_data``.
    """
    n = len(batch[data_column])
    previous_errors = batch.get("error")
    images, widths, heights, statuses, errors = [], [], [], [], []
    for i in range(n):
        earlier = None if previous_errors is None else previous_errors[i]
        try:
            if not _missing(earlier):
                raise DecodeError(str(earlier))
            decoded = decode_image(
                batch[data_column][i],
                max_pixels=max_pixels,
                target_short_side=target_short_side,
                max_long_side=max_long_side,
                apply_exif=apply_exif,
            )
        except Exception as e:  # noqa: BLE001 - one bad image must never fail the batch
            message = str(e) if isinstance(e, DecodeError) else _describe_failure(e, "image")
            images.append(np.zeros((0, 0, 3), dtype=np.uint8))
            widths.append(None)
            heights.append(None)
            statuses.append("error")
            errors.append(message)
            continue
        images.append(decoded.array)
        widths.append(decoded.width)
        heights.append(decoded.height)
        statuses.append("ok")
        errors.append(None)
    out = {k: v for k, v in batch.items() if keep_data or k != data_column}
    out.update(image=images, width=widths, height=heights, status=statuses, error=errors)
    return out


def _missing(value: Any) -> bool:
    """None, or how a null string comes back from a columnar batch (NaN, empty)."""
    if value is None or isinstance(value, str):
        return not value
    return isinstance(value, (float, np.floating)) and bool(np.isnan(value))


_heif_registered = False


def _register_heif() -> None:
    """Pillow reads HEIC / HEIF through the pillow-heif plugin (AVIF it reads itself)."""
    global _heif_registered
    if _heif_registered:
        return
    try:
        import pillow_heif
    except ImportError:
        raise DecodeError("HEIC / HEIF image: decoding it needs the pillow-heif package "
                          "(pip install pillow-heif)") from None
    pillow_heif.register_heif_opener()
    _heif_registered = True


def _keep_truncated_images_failing() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was switched on by other code; panoray switches "
            "it off so truncated images become error rows instead of half-grey pictures"
        )
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _open(data: bytes, *, fmt: str | None, max_pixels: int) -> Image.Image:
    """Parse the header only and enforce the pixel limit; no pixel data is decoded here."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's check must not undercut an explicit limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        claimed = f"{int(pixels.group(1))} pixels" if pixels else "more pixels than Pillow allows"
        raise DecodeError(_too_large(claimed, max_pixels)) from None
    except Image.UnidentifiedImageError:
        if fmt is None:
            raise DecodeError(
                f"not an image: no known image format starts with {data[:12]!r} "
                f"({len(data)} bytes)"
            ) from None
        raise DecodeError(
            f"corrupt {fmt}: the file starts like a {fmt} but its header cannot be read "
            "(bad checksum or damaged bytes)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a property of the input
        raise DecodeError(_describe_failure(e, fmt or "image")) from None
    width, height = im.size
    if width * height > max_pixels:
        raise DecodeError(_too_large(f"{width} x {height} pixels", max_pixels))
    if width == 0 or height == 0:
        raise DecodeError(f"corrupt {im.format}: the header says {width} x {height} pixels")
    return im


def _too_large(claimed: str, max_pixels: int) -> str:
    return (
        f"image too large: {claimed} exceeds the limit of {max_pixels} pixels; "
        "raise --max-pixels to allow it"
    )


def _verify_png(data: bytes) -> None:
    """Check every chunk's CRC (Pillow does not check IDAT CRCs when it decodes)."""
    with Image.open(io.BytesIO(data)) as im:
        im.verify()


def _upright(im: Image.Image) -> Image.Image:
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels are still fine, keep them
        orientation = 1
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return im if method is None else im.transpose(method)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> an RGB image (see the module docstring for the colour policy)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(im), sixteen_bit=mode.startswith("I;16"))
        return Image.fromarray(grey).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _scale_to_uint8(values: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    """High-bit-depth grey levels -> 0..255, keeping the full range instead of clipping.

    16-bit data (0..65535) is divided by 257 (65535 -> 255, 257 -> 1). 32-bit integer or float
    data is mapped from the range its values occupy: floats within 0..1 are scaled by 255, values
    within 0..255 kept, values within 0..65535 divided by 257, anything else stretched from its
    minimum to its maximum.
    """
    is_float = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if sixteen_bit:
        scaled = values / 257.0
    elif is_float and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = values
    elif lo >= 0 and hi <= 65535:
        scaled = values / 257.0
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _describe_failure(error: BaseException, fmt: str) -> str:
    message = str(error) or type(error).__name__
    if "truncated" in message or "end of file" in message.lower():
        return f"truncated {fmt}: {message}; the file was cut short"
    if isinstance(error, (SyntaxError, OSError)) or "broken" in message:
        return f"corrupt {fmt}: {message}"
    return f"cannot decode {fmt}: {type(error).__name__}: {message}"
