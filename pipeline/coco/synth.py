"""A synthetic panoptic dataset in COCO panoptic format, small enough to learn on a CPU.

Each image shows 1-4 coloured shapes ("things": circle, square, triangle, star; instances of
varied size and rotation that may overlap, each keeping most of itself visible) on 2-3
textured background regions ("stuff": sky gradient, grass noise, water stripes, sand dots).
Shape colours lean to a hue per class with some variation, so shape is the main cue.

Layout under ``dst`` (any URI :mod:`model.storage` understands)::

    dst/train/panoptic.json          COCO panoptic JSON: images, annotations, categories
    dst/train/images/<id>.jpg        the RGB image, <id> = image id as 12 digits
    dst/train/panoptic/<id>.png      its COCO panoptic PNG (id = R + 256 G + 256^2 B)
    dst/val/...                      the same for the validation split

The PNG folder is the JSON's path without ``.json``, the default panopticapi (and
:func:`pipeline.evaluate.pq_compute`) assume. Segment ids are ``category_id * 1000`` for stuff
and ``category_id * 1000 + k`` (k = 1, 2, ...) for the k-th instance of a thing. Files are a
function of (seed, split, image index) only: the same seed writes byte-identical files,
another seed different ones, and the splits never share an image. Existing files are
overwritten; files of an earlier, larger run are left in place.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from model.storage import get_filesystem, join, redact
from pipeline.coco.panoptic_io import encode_panoptic_png, segment_stats
from pipeline.progress import Progress

log = logging.getLogger(__name__)

SYNTH_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 40, 40], "supercategory": "shape"},
    {"id": 2, "name": "square", "isthing": 1, "color": [235, 200, 30], "supercategory": "shape"},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [210, 50, 200], "supercategory": "shape"},
    {"id": 4, "name": "star", "isthing": 1, "color": [120, 60, 225], "supercategory": "shape"},
    {"id": 5, "name": "sky", "isthing": 0, "color": [140, 190, 235], "supercategory": "ground"},
    {"id": 6, "name": "grass", "isthing": 0, "color": [60, 150, 50], "supercategory": "ground"},
    {"id": 7, "name": "water", "isthing": 0, "color": [30, 70, 160], "supercategory": "ground"},
    {"id": 8, "name": "sand", "isthing": 0, "color": [210, 190, 140], "supercategory": "ground"},
]
_THING_HUE = {1: 0.0, 2: 50.0, 3: 310.0, 4: 265.0}  # degrees; each class's hue centre
_STUFF_IDS = (5, 6, 7, 8)
_SPLITS = ("train", "val")
_WRITE_BATCH = 64  # images whose files are uploaded together


def make_synthetic_dataset(
    dst_uri: str,
    *,
    num_train: int,
    num_val: int,
    image_size: tuple[int, int] = (128, 128),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the train and val splits under ``dst_uri``; returns a summary (counts, URIs).

    image_size: (H, W) in pixels, at least 64 each. Hundreds of images take seconds.
    progress: the images written so far (`pipeline.progress`).
    """
    height, width = image_size
    if height < 64 or width < 64:
        raise ValueError(f"image_size {image_size} is too small for the shapes; use >= (64, 64)")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    fs, root = get_filesystem(dst_uri)
    summary: dict[str, Any] = {
        "uri": redact(dst_uri), "image_size": [height, width], "seed": seed, "splits": {}
    }
    meter = Progress("synth", total=num_train + num_val, enabled=progress, log=log)
    for split_index, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
        split_root = f"{root.rstrip('/')}/{split}"
        for folder in ("images", "panoptic"):
            fs.makedirs(f"{split_root}/{folder}", exist_ok=True)
        images, annotations, pending = [], [], {}
        for index in range(count):
            image_id = index + 1
            rng = np.random.default_rng([seed, split_index, index])
            rgb, id_map, categories = render_sample(rng, height=height, width=width)
            name = f"{image_id:012d}"
            images.append(
                {"id": image_id, "file_name": f"{name}.jpg", "height": height, "width": width}
            )
            annotations.append(
                {
                    "image_id": image_id,
                    "file_name": f"{name}.png",
                    "segments_info": _segments_info(id_map, categories),
                }
            )
            pending[f"{split_root}/images/{name}.jpg"] = _encode_jpeg(rgb)
            pending[f"{split_root}/panoptic/{name}.png"] = encode_panoptic_png(id_map)
            if len(pending) >= 2 * _WRITE_BATCH:
                fs.pipe(pending)
                pending = {}
            meter.advance()
        if pending:
            fs.pipe(pending)
        doc = {
            "info": {"description": f"panoray synthetic shapes, split {split}, seed {seed}"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": SYNTH_CATEGORIES,
        }
        fs.pipe_file(f"{split_root}/panoptic.json", json.dumps(doc, sort_keys=True).encode())
        summary["splits"][split] = {
            "images": count,
            "segments": sum(len(a["segments_info"]) for a in annotations),
            "json": redact(join(dst_uri, split, "panoptic.json")),
        }
    meter.close()
    return summary


def render_sample(
    rng: np.random.Generator, *, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """One image: (H, W, 3) uint8 RGB, (H, W) uint32 segment ids, {segment id: category id}."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    id_map = np.zeros((height, width), dtype=np.uint32)
    rgb = np.zeros((height, width, 3), dtype=np.float32)
    categories: dict[int, int] = {}

    regions, stuff_ids = _stuff_regions(rng, yy, xx)
    for region, category_id in enumerate(stuff_ids):
        mask = regions == region
        rgb[mask] = _stuff_texture(rng, category_id, yy, xx)[mask]
        id_map[mask] = category_id * 1000
        categories[category_id * 1000] = category_id

    full_area: dict[int, int] = {}  # instance segment id -> its area before occlusion
    counts = dict.fromkeys(_THING_HUE, 0)
    for _ in range(int(rng.integers(1, 5))):
        category_id = int(rng.choice(list(_THING_HUE)))
        for _attempt in range(10):
            mask = _thing_mask(rng, category_id, height=height, width=width)
            if mask.sum() >= 0.01 * height * width and _keeps_others(mask, id_map, full_area):
                break
        else:
            continue  # no placement leaves the others visible enough: fewer shapes
        counts[category_id] += 1
        segment_id = category_id * 1000 + counts[category_id]
        rgb[mask] = _thing_texture(rng, category_id, yy, xx)[mask]
        id_map[mask] = segment_id
        categories[segment_id] = category_id
        full_area[segment_id] = int(mask.sum())
    return np.clip(rgb, 0, 255).round().astype(np.uint8), id_map, categories


def _keeps_others(mask: np.ndarray, id_map: np.ndarray, full_area: dict[int, int]) -> bool:
    """True when painting ``mask`` on top leaves every earlier instance >= 60% visible."""
    for segment_id, area in full_area.items():
        visible = id_map == segment_id
        if np.count_nonzero(visible & ~mask) < 0.6 * area:
            return False
    return True


def _stuff_regions(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, list[int]]:
    """(H, W) region index per pixel (a wavy Voronoi split) and the stuff class per region."""
    height, width = yy.shape
    k = int(rng.integers(2, 4))
    stuff_ids = [int(c) for c in rng.choice(_STUFF_IDS, size=k, replace=False)]
    size = np.array([height, width], dtype=np.float32)
    for _ in range(50):
        seeds = rng.uniform(0.1, 0.9, size=(k, 2)) * size
        gaps = [np.linalg.norm(a - b) for i, a in enumerate(seeds) for b in seeds[i + 1 :]]
        if min(gaps) >= 0.4 * size.min():
            break
    amplitude = rng.uniform(0.03, 0.08) * size.min()
    waves = rng.uniform(0.4, 1.0, size=2)  # wavelengths, in image sizes
    phases = rng.uniform(0, 2 * np.pi, size=2)
    wy = yy + amplitude * np.sin(2 * np.pi * xx / (waves[0] * width) + phases[0])
    wx = xx + amplitude * np.sin(2 * np.pi * yy / (waves[1] * height) + phases[1])
    dist = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
    return dist.argmin(axis=0), stuff_ids


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """(H, W) float32 noise, roughly unit variance, smooth over ``cell`` pixels."""
    h, w = shape
    small = rng.normal(size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR))


def _stuff_texture(
    rng: np.random.Generator, category_id: int, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """(H, W, 3) float32 texture of one stuff class, colours jittered per image."""
    h, w = yy.shape
    base = np.array(SYNTH_CATEGORIES[category_id - 1]["color"], np.float32)
    base = base + rng.uniform(-15, 15, size=3)
    fine = rng.normal(size=(h, w)).astype(np.float32)
    if category_id == 5:  # sky: vertical gradient, nearly flat
        t = (yy / h)[..., None]
        tex = base * (1 - 0.3 * t) + np.array([240, 245, 250], np.float32) * 0.3 * t
        return tex + 3 * fine[..., None]
    if category_id == 6:  # grass: blotchy, grainy green with vertical streaks
        blotch = _smooth_noise(rng, (h, w), 12)
        streak = rng.normal(size=(1, w)).astype(np.float32)
        light = 18 * blotch + 14 * fine + 12 * streak
        return base + light[..., None] * np.array([0.5, 1.0, 0.4], np.float32)
    if category_id == 7:  # water: horizontal waves
        period = rng.uniform(6, 10)
        phase = 2 * np.pi * yy / period + 1.5 * np.sin(2 * np.pi * xx / rng.uniform(30, 60))
        light = 28 * np.sin(phase) + 4 * fine
        return base + light[..., None] * np.array([0.6, 0.8, 1.0], np.float32)
    # sand: pale, fine grain with dark dots
    dots = (rng.uniform(size=(h, w)) < 0.04).astype(np.float32)
    light = 6 * fine - 70 * dots
    return base + light[..., None]


def _thing_texture(
    rng: np.random.Generator, category_id: int, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """(H, W, 3) float32 fill for one instance: a class-leaning colour with shading."""
    h, w = yy.shape
    hue = (_THING_HUE[category_id] + rng.uniform(-15, 15)) % 360 / 360
    color = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 0.95), rng.uniform(0.75, 1.0))
    base = 255 * np.array(color, np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    shade = (np.cos(angle) * xx / w + np.sin(angle) * yy / h - 0.5) * 0.25
    fine = rng.normal(size=(h, w)).astype(np.float32)
    return base * (1 + shade[..., None]) + 5 * fine[..., None]


def _thing_mask(
    rng: np.random.Generator, category_id: int, *, height: int, width: int
) -> np.ndarray:
    """(H, W) bool mask of one shape of the class, of random size, place and rotation."""
    radius = rng.uniform(0.12, 0.22) * min(height, width)
    cy = rng.uniform(0.6 * radius, height - 0.6 * radius)
    cx = rng.uniform(0.6 * radius, width - 0.6 * radius)
    rotation = rng.uniform(0, 2 * np.pi)
    if category_id == 1:  # circle
        yy, xx = np.ogrid[0:height, 0:width]
        return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius**2
    if category_id == 2:  # square: corners on a circle a bit larger than the disc
        angles, radii = np.arange(4) * np.pi / 2, np.full(4, 1.1 * radius)
    elif category_id == 3:  # equilateral triangle
        angles, radii = np.arange(3) * 2 * np.pi / 3, np.full(3, 1.3 * radius)
    else:  # five-pointed star, alternating outer and inner corners
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.35 * radius, 0.6 * radius)
    xs = cx + radii * np.cos(angles + rotation)
    ys = cy + radii * np.sin(angles + rotation)
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist())), fill=1)
    return np.asarray(canvas, dtype=bool)


def _segments_info(id_map: np.ndarray, categories: dict[int, int]) -> list[dict[str, Any]]:
    """COCO segments_info of every segment visible in ``id_map``, in id order."""
    return [
        {"id": i, "category_id": categories[i], "iscrowd": 0, "area": area, "bbox": bbox}
        for i, (area, bbox) in sorted(segment_stats(id_map).items())
    ]


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()
