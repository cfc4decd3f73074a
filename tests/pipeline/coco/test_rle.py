"""Our COCO RLE encoder against pycocotools' own, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.coco.rle import compress_counts, encode_segments, mask_counts

mask_api = pytest.importorskip("pycocotools.mask")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.mask")


def _reference(mask: np.ndarray) -> dict:
    return mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))


@pytest.mark.parametrize("seed", range(4))
def test_compressed_counts_equal_pycocotools(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        h, w = rng.integers(1, 50, 2)
        ids = rng.integers(0, 5, (h, w))
        if rng.random() < 0.3:  # long runs, as real maps have
            ids = np.repeat(np.repeat(rng.integers(0, 3, (4, 4)), 13, 0), 11, 1)[:h, :w]
        for seg_id, rle in encode_segments(ids, [0, 1, 2, 3, 4, 9]).items():
            mask = ids == seg_id
            assert rle["size"] == [int(ids.shape[0]), int(ids.shape[1])]
            assert rle["counts"] == _reference(mask)["counts"].decode()
            assert np.array_equal(mask_api.decode(rle).astype(bool), mask)


def test_uncompressed_counts_are_column_major_zeros_first():
    mask = np.array([[1, 0, 0],
                     [1, 1, 0]], bool)  # column-major: 1 1 0 1 0 0
    assert mask_counts(mask) == [0, 2, 1, 1, 2]
    assert mask_counts(np.zeros((2, 3), bool)) == [6]
    assert mask_counts(np.ones((2, 3), bool)) == [0, 6]
    rle = mask_api.frPyObjects({"size": [2, 3], "counts": mask_counts(mask)}, 2, 3)
    assert np.array_equal(mask_api.decode(rle).astype(bool), mask)


def test_large_counts_compress_like_pycocotools():
    mask = np.zeros((1000, 1500), bool)
    mask[10:900, 7:1400] = True
    mask[500, 3] = True
    counts = mask_counts(mask)
    assert compress_counts(counts) == _reference(mask)["counts"].decode()
