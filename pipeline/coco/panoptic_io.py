"""COCO panoptic format: id maps <-> PNG bytes, and reading a panoptic JSON + PNG folder.

A COCO panoptic PNG is an RGB image whose colour encodes a segment id per pixel:
``id = R + 256 * G + 256**2 * B``; id 0 is VOID (unlabelled). The JSON beside it lists, per
image, the segments (``segments_info``: id, category_id, iscrowd, area, bbox [x, y, w, h]) and
the PNG's ``file_name`` in the segmentation folder. Everything here takes any URI that
:func:`model.storage.get_filesystem` understands (local path, ``s3://``, ...).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from model.storage import get_filesystem, redact

VOID = 0
MAX_ID = 256**3 - 1  # the largest id three 8-bit channels can hold


class CocoPanoptic(NamedTuple):
    """A COCO panoptic JSON, indexed: every dict is the JSON's own record, untouched."""

    images: dict[Any, dict]  # image id -> {"id", "file_name", "height", "width", ...}
    annotations: dict[Any, dict]  # image id -> {"image_id", "file_name", "segments_info"}
    categories: dict[int, dict]  # category id -> {"id", "name", "isthing", "color", ...}


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Colours -> segment ids. ``rgb``: (..., 3) integers 0..255 -> (...) uint32."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1:] != (3,):
        raise ValueError(f"rgb2id needs colours in a last axis of size 3, got shape {rgb.shape}")
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids -> colours. ``ids``: (...) non-negative integers < 256**3 -> (..., 3) uint8."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
        raise ValueError(
            f"segment ids must lie in 0..{MAX_ID} to fit a panoptic PNG, got "
            f"{ids.min()}..{ids.max()}; renumber the segments"
        )
    flat = ids.reshape(-1)
    rgb = np.empty((flat.size, 3), dtype=np.uint8)
    # Unsafe casts keep the low byte: R = id & 255, G = (id >> 8) & 255, B = id >> 16.
    np.copyto(rgb[:, 0], flat, casting="unsafe")
    np.copyto(rgb[:, 1], flat >> 8, casting="unsafe")
    np.copyto(rgb[:, 2], flat >> 16, casting="unsafe")
    return rgb.reshape(*ids.shape, 3)


def encode_panoptic_png(id_map: np.ndarray) -> bytes:
    """(H, W) segment ids -> the bytes of a COCO panoptic PNG (RGB, 8 bits per channel).

    Written directly (signature, IHDR, one IDAT, IEND) with PNG's "Up" filter on every row: a
    segmentation map's rows mostly repeat the row above, so the filtered bytes are nearly all
    zeros, which zlib's run-length strategy packs fast and small (``bench/encode.py`` measures
    it against Pillow's encoder). Any PNG reader decodes it; :func:`decode_panoptic_png`
    reverses it.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"a panoptic id map is (H, W), got shape {id_map.shape}")
    h, w = id_map.shape
    if h == 0 or w == 0:
        raise ValueError(f"a panoptic id map needs at least one pixel, got shape {id_map.shape}")
    rgb = id2rgb(id_map).reshape(h, 3 * w)
    rows = np.empty((h, 3 * w + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up: each byte minus the byte above it (mod 256)
    rows[0, 1:] = rgb[0]
    np.subtract(rgb[1:], rgb[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", _deflate(rows)),
                     _png_chunk(b"IEND", b"")))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _deflate(data: np.ndarray) -> bytes:
    packer = _ZLIB.compressobj(1, _ZLIB.DEFLATED, 15, 9, _ZLIB.Z_RLE)
    return packer.compress(data) + packer.flush()


try:  # zlib-ng: the same streams (and sizes) as zlib, about 8x faster on these rows
    from zlib_ng import zlib_ng as _ZLIB
except ImportError:  # pragma: no cover - a platform without its wheels
    _ZLIB = zlib


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decode_panoptic_png(data: bytes) -> np.ndarray:
    """The bytes of a COCO panoptic PNG -> (H, W) uint32 segment ids."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("RGB", "RGBA"):
            raise ValueError(
                f"a COCO panoptic PNG is RGB, this one is mode {img.mode!r}; "
                "re-encode it with id = R + 256 G + 256^2 B"
            )
        rgb = np.asarray(img)[..., :3]
    return rgb2id(rgb)


def read_bytes(uri: str) -> bytes:
    """All bytes of the file at ``uri``; a missing file says which one."""
    fs, path = get_filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{redact(uri)} does not exist; check the path") from None


def read_panoptic_png(uri: str) -> np.ndarray:
    """The COCO panoptic PNG at ``uri`` -> (H, W) uint32 segment ids."""
    return decode_panoptic_png(read_bytes(uri))


def read_json(uri: str) -> dict:
    """The JSON document at ``uri``."""
    return json.loads(read_bytes(uri))


def index_coco_panoptic(doc: dict) -> CocoPanoptic:
    """Index an already-parsed COCO panoptic JSON by image id and category id."""
    for key in ("annotations", "categories"):
        if key not in doc:
            raise ValueError(f"not a COCO panoptic JSON: it has no {key!r} list")
    images = {img["id"]: img for img in doc.get("images", [])}
    annotations = {ann["image_id"]: ann for ann in doc["annotations"]}
    categories = {cat["id"]: cat for cat in doc["categories"]}
    return CocoPanoptic(images=images, annotations=annotations, categories=categories)


def load_coco_panoptic(json_uri: str) -> CocoPanoptic:
    """Read and index the COCO panoptic JSON at ``json_uri`` (images, annotations, categories)."""
    return index_coco_panoptic(read_json(json_uri))


def segment_stats(id_map: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """Per non-void segment id in ``id_map`` (H, W): (area in pixels, bbox [x, y, w, h]).

    The bbox is COCO's: top-left corner and size of the tightest box holding the segment.
    Works on the map's horizontal runs (a segmentation map has a few per row), so the cost is
    one comparison pass over the pixels plus work in the number of runs.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"a panoptic id map is (H, W), got shape {id_map.shape}")
    h, w = id_map.shape
    if id_map.size == 0:
        return {}
    # A run starts at column 0 of every row and wherever a pixel differs from its left one.
    starts = np.ones((h, w), dtype=bool)
    np.not_equal(id_map[:, 1:], id_map[:, :-1], out=starts[:, 1:])
    flat = np.flatnonzero(starts)  # run starts in row-major order
    ends = np.empty_like(flat)  # one past each run's last pixel (runs never cross rows)
    ends[:-1] = flat[1:]
    ends[-1] = h * w
    row = flat // w
    ends = np.minimum(ends, (row + 1) * w)
    x_start = flat - row * w
    x_end = ends - row * w  # exclusive
    run_ids = id_map.ravel()[flat]
    ids, inverse = np.unique(run_ids, return_inverse=True)
    n = len(ids)
    area = np.bincount(inverse, weights=ends - flat, minlength=n).astype(np.int64)
    x0 = np.full(n, w, dtype=np.int64)
    y0 = np.full(n, h, dtype=np.int64)
    x1 = np.zeros(n, dtype=np.int64)
    y1 = np.zeros(n, dtype=np.int64)
    np.minimum.at(x0, inverse, x_start)
    np.minimum.at(y0, inverse, row)
    np.maximum.at(x1, inverse, x_end)
    np.maximum.at(y1, inverse, row + 1)
    return {
        int(i): (int(area[k]), [int(x0[k]), int(y0[k]), int(x1[k] - x0[k]), int(y1[k] - y0[k])])
        for k, i in enumerate(ids.tolist())
        if i != VOID
    }
