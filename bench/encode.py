"""Encoding one prediction into its output columns: COCO panoptic PNG + segments_info.

Side by side in one run, interleaved: ``encode_result`` as the segment job runs it now
(``pipeline.segment.schema``: run-based segment statistics, a PNG written with the Up filter and
zlib's run-length strategy) vs the code before (kept here as the baseline: ``np.unique`` +
``ufunc.at`` statistics over every pixel, Pillow's PNG encoder). Maps: 640 x 480 with 3
segments (the cluster-scale issue's shape), and a busier 1333 x 800 map with 40 segments.
Also checks that both PNGs decode to the same ids and the statistics agree.

Run: ``python bench/encode.py [--repeats 50]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from pipeline.coco.panoptic_io import decode_panoptic_png, encode_panoptic_png, segment_stats
from pipeline.segment.schema import encode_result


def before_stats(id_map: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    ids, inverse, areas = np.unique(id_map.ravel(), return_inverse=True, return_counts=True)
    h, w = id_map.shape
    ys, xs = np.repeat(np.arange(h), w), np.tile(np.arange(w), h)
    n = len(ids)
    x0, y0, x1, y1 = np.full(n, w), np.full(n, h), np.full(n, -1), np.full(n, -1)
    np.minimum.at(x0, inverse, xs)
    np.minimum.at(y0, inverse, ys)
    np.maximum.at(x1, inverse, xs)
    np.maximum.at(y1, inverse, ys)
    return {int(i): (int(a), [int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1),
                              int(y1[k] - y0[k] + 1)])
            for k, (i, a) in enumerate(zip(ids, areas)) if i != 0}


def before_png(id_map: np.ndarray) -> bytes:
    ids = id_map.astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def before_encode(id_map, infos):
    stats = before_stats(id_map)
    return before_png(id_map), [{**s, "area": stats[s["id"]][0], "bbox": stats[s["id"]][1]}
                                for s in infos if s["id"] in stats]


def shapes_map(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    """Stuff bands plus `n - 3` discs: what a panoptic prediction looks like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    m = np.ones((h, w), np.int32)
    m[yy > h * 0.6] = 2
    m[(xx < w * 0.2) & (yy < h * 0.4)] = 3
    for k in range(4, n + 1):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, min(h, w) / 4)
        m[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
    return m


def three_segments(h: int = 480, w: int = 640) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), np.int32)
    m[(yy - 200) ** 2 + (xx - 300) ** 2 < 120 ** 2] = 1
    m[yy > 380] = 2
    m[(xx < 100) & (yy < 200)] = 3
    return m


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    cases = [("640x480, 3 segments", three_segments()),
             ("1333x800, 40 segments", shapes_map(800, 1333, 40))]
    print("| map | before ms | now ms | speed-up | before PNG bytes | now PNG bytes |")
    print("|---|---|---|---|---|---|")
    for name, id_map in cases:
        infos = [{"id": int(i), "category_id": 1, "isthing": True, "score": 0.9}
                 for i in np.unique(id_map) if i]
        old_png, old_info = before_encode(id_map, infos)
        new_png, new_info = encode_result(id_map, infos)
        assert (decode_panoptic_png(new_png) == id_map).all()
        assert (decode_panoptic_png(old_png) == decode_panoptic_png(new_png)).all()
        assert segment_stats(id_map) == before_stats(id_map)
        assert [(s["area"], s["bbox"]) for s in old_info] == \
            [(s["area"], s["bbox"]) for s in new_info]
        before, now = [], []
        for _ in range(args.repeats):  # interleaved: machine load hits both alike
            before.append(timed(before_encode, id_map, infos))
            now.append(timed(encode_result, id_map, infos))
        b, n = statistics.median(before), statistics.median(now)
        print(f"| {name} | {b:.2f} | {n:.2f} | {b / n:.1f}x | {len(old_png)} | "
              f"{len(encode_panoptic_png(id_map))} |")


if __name__ == "__main__":
    main()
