"""point_sample against a float64 bilinear lookup; importance sampling picks uncertain points."""

from __future__ import annotations

import math

import pytest
import torch

from model.ops import has_compiled_op
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


needs_op = pytest.mark.skipif(not has_compiled_op(), reason="model._C is not built")


def topk_selection(logits: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The Python path: grid_sample, -|logit|, top-k, gather."""
    uncertainty = -point_sample(logits.unsqueeze(1), candidates).abs()[:, 0]
    top = torch.topk(uncertainty, k=k, dim=1).indices
    return torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))


@needs_op
@pytest.mark.parametrize("shape", [(5, 32, 32), (2, 7, 13), (1, 1, 1)])
def test_compiled_selection_keeps_the_top_k_set(shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(*shape, generator=g) * 3
    candidates = torch.rand(shape[0], 3000, 2, generator=g)
    k = 750
    got = torch.ops.panoray.most_uncertain_points(logits, candidates, k)
    want = topk_selection(logits, candidates, k)
    assert got.shape == (shape[0], k, 2)
    for r in range(shape[0]):
        assert sorted(map(tuple, got[r].tolist())) == sorted(map(tuple, want[r].tolist()))
        # kept in candidate order
        index = {tuple(c): i for i, c in enumerate(candidates[r].tolist())}
        order = [index[tuple(c)] for c in got[r].tolist()]
        assert order == sorted(order)

    # Candidates outside the map read the zero padding: many score exactly 0 and tie, so only
    # the kept scores are comparable, not which of the tied points were kept.
    outside = candidates * 1.6 - 0.3
    got = torch.ops.panoray.most_uncertain_points(logits, outside, k)
    want = topk_selection(logits, outside, k)
    def kept_scores(points):
        return point_sample(logits.unsqueeze(1), points).abs().sort(dim=-1).values
    torch.testing.assert_close(kept_scores(got), kept_scores(want), rtol=0, atol=1e-6)

    # Points a float's width either side of where the map's last and first bilinear corners
    # end (pixel coordinates -1 and w or h), where rounding decides the cell.
    h, w = shape[1:]
    edges = torch.tensor([-0.5 / w, (w + 0.5) / w, -0.5 / h, (h + 0.5) / h])
    edges = torch.cat([torch.nextafter(edges, edges - 1), edges, torch.nextafter(edges, edges + 1)])
    grid = torch.cartesian_prod(edges, edges)  # (144, 2)
    points = torch.cat([grid, candidates[0, :856]])[None].expand(shape[0], -1, -1).contiguous()
    got = torch.ops.panoray.most_uncertain_points(logits, points, 500)
    torch.testing.assert_close(kept_scores(got), kept_scores(topk_selection(logits, points, 500)),
                               rtol=0, atol=1e-6)


@needs_op
def test_compiled_selection_ties_nan_and_edge_sizes():
    candidates = torch.rand(2, 10, 2, generator=torch.Generator().manual_seed(0))
    flat = torch.zeros(2, 4, 4)  # every candidate reads exactly 0: the first k win the tie
    assert torch.equal(torch.ops.panoray.most_uncertain_points(flat, candidates, 3),
                       candidates[:, :3])
    # NaN counts as the most uncertain, as torch.topk ranks it: only the points that read the
    # NaN pixel (0, 0) are kept, even against logits of 0.
    with_nan = torch.full((1, 4, 4), 10.0)
    with_nan[0, 3, 3] = 0.0
    with_nan[0, 0, 0] = float("nan")
    points = torch.tensor([[[0.1, 0.1], [0.875, 0.875], [0.125, 0.125], [0.6, 0.6]]])
    assert torch.equal(torch.ops.panoray.most_uncertain_points(with_nan, points, 2),
                       points[:, [0, 2]])
    assert torch.ops.panoray.most_uncertain_points(flat, candidates, 0).shape == (2, 0, 2)
    torch.library.opcheck(torch.ops.panoray.most_uncertain_points.default, (flat, candidates, 3))
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.panoray.most_uncertain_points(flat, candidates, 11)
    with pytest.raises(RuntimeError, match="must be float32"):
        torch.ops.panoray.most_uncertain_points(flat.double(), candidates, 1)
    with pytest.raises(RuntimeError, match="maps are empty"):
        torch.ops.panoray.most_uncertain_points(flat[:, :0], candidates, 1)
    with pytest.raises(RuntimeError, match="candidates must be"):
        torch.ops.panoray.most_uncertain_points(flat, candidates[..., :1], 1)


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
