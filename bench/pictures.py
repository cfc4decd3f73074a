"""Synthetic photos for the benchmarks: smooth random pictures as JPEG bytes, so decoding and
PNG encoding cost what real photos cost. Imported by the bench scripts beside it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def smooth_jpegs(n: int, width: int, height: int, *, seed: int = 0) -> list[bytes]:
    """`n` JPEGs of width x height: random 1/16-size colours, bicubically upsampled."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
