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
    ids = ids.astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def encode_panoptic_png(id_map: np.ndarray) -> bytes:
    """(H, W) segment ids -> the bytes of a COCO panoptic PNG (RGB, 8 bits per channel)."""
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"a panoptic id map is (H, W), got shape {id_map.shape}")
    buf = io.BytesIO()
    Image.fromarray(id2rgb(id_map), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


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
    """
    id_map = np.asarray(id_map)
    ids, inverse, areas = np.unique(id_map.ravel(), return_inverse=True, return_counts=True)
    h, w = id_map.shape
    ys = np.repeat(np.arange(h), w)
    xs = np.tile(np.arange(w), h)
    n = len(ids)
    x0 = np.full(n, w)
    y0 = np.full(n, h)
    x1 = np.full(n, -1)
    y1 = np.full(n, -1)
    np.minimum.at(x0, inverse, xs)
    np.minimum.at(y0, inverse, ys)
    np.maximum.at(x1, inverse, xs)
    np.maximum.at(y1, inverse, ys)
    return {
        int(i): (int(a), [int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1)])
        for k, (i, a) in enumerate(zip(ids, areas))
        if i != VOID
    }
