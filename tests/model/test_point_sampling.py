"""point_sample against a float64 bilinear lookup; importance sampling picks uncertain points."""

from __future__ import annotations

import math

import pytest
import torch

from model.point_sampling import (
    point_sample,
    seeded_generators,
    uncertain_point_coords_with_randomness,
)


def bilinear_float64(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """(C,) value of a (C, H, W) image at normalised (x, y); pixel centres at (j + 0.5) / W."""
    channels, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(channels, dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * image[:, yy, xx].double()
    return out


def test_point_sample_equals_float64_bilinear_lookup():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 5, 7, generator=g)
    points = torch.rand(2, 40, 2, generator=g)
    points[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5 / 7, 0.5 / 5]])
    got = point_sample(image, points)
    assert got.shape == (2, 3, 40)
    for n in range(2):
        for p in range(40):
            want = bilinear_float64(image[n], float(points[n, p, 0]), float(points[n, p, 1]))
            torch.testing.assert_close(got[n, :, p].double(), want, rtol=1e-5, atol=1e-5)


def test_point_sample_reads_pixel_centres_exactly():
    image = torch.arange(12.0).reshape(1, 1, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    centres = torch.stack([(xs + 0.5) / 4, (ys + 0.5) / 3], dim=-1).reshape(1, 12, 2)
    got = point_sample(image, centres)
    torch.testing.assert_close(got, image.reshape(1, 1, 12), atol=1e-5, rtol=0)


def test_point_sample_accepts_a_grid_of_points():
    image = torch.randn(1, 2, 6, 6)
    grid = torch.rand(1, 3, 4, 2)
    flat = point_sample(image, grid.reshape(1, 12, 2))
    assert torch.equal(point_sample(image, grid).reshape(1, 2, 12), flat)


@pytest.mark.parametrize("importance_sample_ratio", [0.0, 0.75, 1.0])
def test_importance_points_are_the_most_uncertain_candidates(importance_sample_ratio):
    num_points, oversample_ratio, seed = 50, 3.0, 7
    logits = torch.randn(3, 1, 9, 11, generator=torch.Generator().manual_seed(1)) * 4
    coords = uncertain_point_coords_with_randomness(
        logits,
        num_points=num_points,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
        generator=torch.Generator().manual_seed(seed),
    )
    assert coords.shape == (3, num_points, 2)
    assert coords.min() >= 0 and coords.max() <= 1

    # Replay the documented draws and rank the candidates with the float64 lookup.
    g = torch.Generator().manual_seed(seed)
    candidates = torch.rand(3, int(num_points * oversample_ratio), 2, generator=g)
    num_uncertain = int(importance_sample_ratio * num_points)
    fill = torch.rand(3, num_points - num_uncertain, 2, generator=g)
    for r in range(3):
        uncertainty = torch.stack(
            [-bilinear_float64(logits[r], float(x), float(y)).abs()[0] for x, y in candidates[r]]
        )
        want = candidates[r][uncertainty.argsort(descending=True)[:num_uncertain]]
        got = coords[r, :num_uncertain]
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
        assert torch.equal(coords[r, num_uncertain:], fill[r])


def test_importance_points_concentrate_where_uncertainty_peaks():
    # Uncertainty peaks along the vertical line x = 0.5 and falls off linearly to the sides; the
    # zero padding only lowers it at the borders, so border points are never preferred.
    xs = (torch.arange(64) + 0.5) / 64
    scores = (100 - 60 * (xs - 0.5).abs()).expand(1, 1, 64, 64).contiguous()
    coords = uncertain_point_coords_with_randomness(
        scores,
        uncertainty_fn=lambda point_scores: point_scores,
        num_points=400,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        generator=torch.Generator().manual_seed(3),
    )
    uncertain, random = coords[0, :300], coords[0, 300:]
    # The top quarter of 1200 uniform candidates lies within about 0.125 of the line.
    assert (uncertain[:, 0] - 0.5).abs().max() < 0.2
    assert (random[:, 0] - 0.5).abs().max() > 0.3


def test_bad_sampling_ratios_say_what_to_use():
    logits = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="oversample_ratio must be >= 1"):
        uncertain_point_coords_with_randomness(
            logits, num_points=4, oversample_ratio=0.5, importance_sample_ratio=0.5
        )
    with pytest.raises(ValueError, match=r"importance_sample_ratio must be in \[0, 1\]"):
        uncertain_point_coords_with_randomness(
            logits, num_points=4, oversample_ratio=2, importance_sample_ratio=1.5
        )


def test_seeded_generators_repeat_their_points():
    first = [torch.rand(3, generator=g) for g in seeded_generators(seeds=[1, 2])]
    again = [torch.rand(3, generator=g) for g in seeded_generators(seeds=[1, 2])]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])
