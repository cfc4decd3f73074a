"""A corpus of awkward image files, for the decode tests and, later, the end-to-end tests.

Plain module, no pytest: tests in ``tests/pipeline`` import it as ``import bad_inputs``
(pytest puts their folder on ``sys.path``); tests elsewhere can load it with
``importlib.util.spec_from_file_location``. Everything is generated deterministically.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# A word each error message must contain, per failing file: what a person would look for.
EXPECTED_ERROR_WORDS = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "bad_crc.png": "corrupt",
    "text.jpg": "not an image",
    "bomb.png": "too large",
}
RED, BLUE = (255, 0, 0), (0, 0, 255)
EXIF_UPRIGHT_SIZE = (60, 40)  # (width, height) of exif_rotated.jpg once turned upright


def make_bad_inputs(dst_dir: str | Path) -> dict[str, str]:
    """Write the corpus into ``dst_dir``; returns file name -> expected status ("ok" / "error")."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    files = {
        "empty.jpg": (b"", "error"),
        "truncated.jpg": (truncated_jpeg(), "error"),
        "bad_crc.png": (png_with_bad_idat_crc(), "error"),
        "text.jpg": (b"this is a text file that only pretends to be a JPEG\n" * 4, "error"),
        "bomb.png": (png_header_only(width=50_000, height=50_000), "error"),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "ok"),
        "cmyk.jpg": (_encode(Image.new("RGB", (16, 16), RED).convert("CMYK"), "JPEG"), "ok"),
        "gray16.png": (_encode(Image.fromarray(gray16_ramp()), "PNG"), "ok"),
        "rgba.png": (_encode(rgba_half_transparent(), "PNG"), "ok"),
        "palette.png": (palette_with_transparency(), "ok"),
        "exif_rotated.jpg": (exif_rotated_jpeg(), "ok"),
    }
    for name, (data, _) in files.items():
        (dst / name).write_bytes(data)
    return {name: status for name, (_, status) in files.items()}


def noise_image(*, width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def truncated_jpeg() -> bytes:
    """A noisy JPEG (so its entropy-coded data is long) cut in the middle."""
    data = _encode(noise_image(), "JPEG")
    return data[: len(data) // 2]


def png_with_bad_idat_crc() -> bytes:
    """A valid PNG whose IDAT checksum is wrong: Pillow decodes it unless the CRC is checked."""
    data = bytearray(_encode(noise_image(width=16, height=16), "PNG"))
    at = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    data[at + 4 + length] ^= 0xFF
    return bytes(data)


def png_header_only(*, width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` RGB pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def gray16_ramp() -> np.ndarray:
    """(8, 32) uint16 ramp over the full 16-bit range: 0, 2114, ..., 65535."""
    ramp = np.linspace(0, 65535, 32).round().astype(np.uint16)
    return np.tile(ramp, (8, 1))


def rgba_half_transparent() -> Image.Image:
    """Left half opaque red, right half fully transparent (stored colour: black)."""
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[:, :10] = (*RED, 255)
    return Image.fromarray(rgba)


def palette_with_transparency() -> bytes:
    """A palette PNG: index 0 (left half) transparent, index 1 (right half) green."""
    indices = np.zeros((10, 20), dtype=np.uint8)
    indices[:, 10:] = 1
    im = Image.fromarray(indices).convert("P")
    im.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Upright: red top half, blue bottom half, 60 x 40. Stored turned 90 degrees
    counter-clockwise (40 x 60, red on the left) with EXIF orientation 6 saying how to undo it."""
    width, height = EXIF_UPRIGHT_SIZE
    upright = np.zeros((height, width, 3), dtype=np.uint8)
    upright[: height // 2] = RED
    upright[height // 2 :] = BLUE
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)
