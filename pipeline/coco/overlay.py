"""Overlay pictures of panoptic results: class colours, segment outlines and class names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _boundaries(id_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour belongs to another segment."""
    edge = np.zeros(id_map.shape, dtype=bool)
    edge[:, :-1] |= id_map[:, :-1] != id_map[:, 1:]
    edge[:-1, :] |= id_map[:-1, :] != id_map[1:, :]
    return edge


def _shade(color: Sequence[int], segment_id: int, isthing: bool) -> np.ndarray:
    """Things of one class get slightly different shades so neighbours stay apart."""
    base = np.asarray(color, dtype=np.float32)
    if not isthing:
        return base
    jitter = ((segment_id * 2654435761) % 61 - 30) / 100.0
    return np.clip(base * (1 + jitter), 0, 255)


def render_overlay(image: np.ndarray, id_map: np.ndarray, segments_info: Sequence[Mapping],
                   categories: Mapping[int, Mapping[str, Any]], *, alpha: float = 0.55,
                   labels: bool = True) -> Image.Image:
    """Blend a panoptic result over its image.

    Args:
        image: (H, W, 3) uint8 RGB, the original image.
        id_map: (H, W) segment ids at the same size (0 = void, left unpainted).
        segments_info: dicts with id, category_id, isthing.
        categories: category id -> {"name", "color"}.
    """
    if image.shape[:2] != id_map.shape:
        image = np.asarray(Image.fromarray(image).resize(id_map.shape[::-1],
                                                         Image.Resampling.BILINEAR))
    out = image.astype(np.float32)
    palette = np.zeros((int(id_map.max()) + 1, 3), dtype=np.float32)
    painted = np.zeros(len(palette), dtype=bool)
    for seg in segments_info:
        sid = int(seg["id"])
        if sid >= len(palette):
            continue
        cat = categories.get(int(seg["category_id"]), {})
        palette[sid] = _shade(cat.get("color", (255, 255, 255)), sid, bool(seg.get("isthing")))
        painted[sid] = True
    mask = painted[id_map]
    out[mask] = (1 - alpha) * out[mask] + alpha * palette[id_map[mask]]
    out[_boundaries(id_map)] = 255
    picture = Image.fromarray(out.round().astype(np.uint8))
    if labels:
        _draw_labels(picture, id_map, segments_info, categories)
    return picture


def _draw_labels(picture: Image.Image, id_map: np.ndarray, segments_info, categories) -> None:
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for seg in segments_info:
        ys, xs = np.nonzero(id_map == int(seg["id"]))
        if len(xs) < 50:
            continue
        # the member pixel nearest the centroid, so labels of concave segments land on them
        cy, cx = ys.mean(), xs.mean()
        k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        name = categories.get(int(seg["category_id"]), {}).get("name", str(seg["category_id"]))
        x, y = int(xs[k]), int(ys[k])
        box = draw.textbbox((x, y), name, font=font, anchor="mm")
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x, y), name, fill=(255, 255, 255), font=font, anchor="mm")


def contact_sheet(pictures: Sequence[Image.Image], *, columns: int = 4,
                  thumb: int = 256) -> Image.Image:
    """Thumbnails of `pictures` in a grid (for a quick look at many results)."""
    if not pictures:
        raise ValueError("no pictures to put on a contact sheet")
    rows = -(-len(pictures) // columns)
    sheet = Image.new("RGB", (columns * thumb, rows * thumb), (32, 32, 32))
    for i, pic in enumerate(pictures):
        scale = thumb / max(pic.size)  # small pictures are enlarged to fill their cell
        small = pic.resize((max(1, round(pic.width * scale)), max(1, round(pic.height * scale))),
                           Image.Resampling.LANCZOS)
        x = (i % columns) * thumb + (thumb - small.width) // 2
        y = (i // columns) * thumb + (thumb - small.height) // 2
        sheet.paste(small, (x, y))
    return sheet
