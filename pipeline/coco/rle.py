"""COCO run-length encoding (RLE) of binary masks, as pycocotools writes it, without pycocotools.

COCO's RLE walks a (H, W) mask in column-major order (down the first column, then the next)
and lists the lengths of alternating runs, zeros first: a mask that starts with a foreground
pixel has a leading 0. ``{"size": [H, W], "counts": [...]}`` is the uncompressed form;
``counts`` as a string is the compressed form of ``pycocotools.mask.encode`` (each count minus
the count two places back from the third on, in little-endian groups of 5 bits with a
continuation bit, offset by 48 into printable ASCII).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def mask_counts(mask: np.ndarray) -> list[int]:
    """(H, W) boolean mask -> COCO's uncompressed RLE counts (column-major, zeros first)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask is (H, W), got shape {mask.shape}")
    return segment_counts(mask.astype(np.uint8), [1])[1]


def segment_counts(id_map: np.ndarray, segment_ids: Iterable[int]) -> dict[int, list[int]]:
    """Uncompressed RLE counts of the mask ``id_map == i`` for each ``i`` in ``segment_ids``.

    One pass over the map for all segments: the runs of the column-major map, grouped by id.
    A segment with no pixel gets ``[H * W]`` (all zeros).
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"a segment id map is (H, W), got shape {id_map.shape}")
    flat = id_map.T.ravel()  # column-major order
    n = flat.size
    wanted = [int(i) for i in segment_ids]
    if n == 0:
        return {i: [] for i in wanted}
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    ends = np.append(starts[1:], n)
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs of one id stay in pixel order
    sorted_values = values[order]
    out: dict[int, list[int]] = {}
    for seg_id in wanted:
        lo, hi = np.searchsorted(sorted_values, [seg_id, seg_id + 1])
        runs = order[lo:hi]
        if len(runs) == 0:
            out[seg_id] = [n]
            continue
        s, e = starts[runs], ends[runs]
        counts = np.empty(2 * len(runs) + 1, dtype=np.int64)
        counts[0] = s[0]  # zeros before the first run (0 when the mask starts with it)
        counts[1::2] = e - s  # the runs of ones
        counts[2:-1:2] = s[1:] - e[:-1]  # the zeros between them
        counts[-1] = n - e[-1]  # trailing zeros
        out[seg_id] = counts[:-1].tolist() if counts[-1] == 0 else counts.tolist()
    return out


def compress_counts(counts: Sequence[int]) -> str:
    """Uncompressed RLE counts -> the compressed ``counts`` string of pycocotools."""
    chars = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as on the C side's signed long
            more = (x != -1) if c & 0x10 else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def encode_segments(id_map: np.ndarray, segment_ids: Iterable[int], *,
                    compressed: bool = True) -> dict[int, dict]:
    """COCO RLE (``{"size": [H, W], "counts": ...}``) of each segment's mask in ``id_map``."""
    h, w = np.asarray(id_map).shape
    return {seg_id: {"size": [int(h), int(w)],
                     "counts": compress_counts(counts) if compressed else counts}
            for seg_id, counts in segment_counts(id_map, segment_ids).items()}
