"""Point sampling for the Mask2Former losses: read masks at continuous points instead of pixels.

Matching and the mask losses look at a few thousand points per mask rather than every pixel,
which makes them cheap and independent of the mask resolution (PointRend, Kirillov et al.;
Mask2Former section 3.2.2). Coordinates are normalised to [0, 1] x [0, 1] over the mask's full
extent, (x, y) order, with `align_corners=False` semantics: (0.5 / W, 0.5 / H) is the centre of
the top-left pixel, whatever the resolution.

Randomness: every function that draws points takes an optional `generator`. Points are drawn on
the generator's device and moved to the data's device, so a CPU generator gives the same points
on CPU and GPU. `seeded_generators` builds one generator per image, which is how callers make the
losses independent of how images are grouped into batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(
    input: Tensor,
    point_coords: Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> Tensor:
    """Bilinearly read `input` at normalised points.

    Args:
        input: (N, C, H, W) feature map.
        point_coords: (N, P, 2) points in [0, 1] x [0, 1], (x, y) order; or (N, Hg, Wg, 2) grid.
        mode, padding_mode, align_corners: passed to `torch.nn.functional.grid_sample`.

    Returns:
        (N, C, P) values (or (N, C, Hg, Wg) for a grid of points).
    """
    points = point_coords.unsqueeze(2) if point_coords.dim() == 3 else point_coords
    out = F.grid_sample(
        input,
        2.0 * points - 1.0,
        mode=mode,
        padding_mode=padding_mode,
        align_corners=align_corners,
    )
    return out.squeeze(3) if point_coords.dim() == 3 else out


def logit_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of a binary mask logit: -|logit|, highest (0) on the decision boundary.

    Args:
        logits: (R, 1, ...) mask logits.

    Returns:
        Same shape as `logits`.
    """
    return -logits.abs()


def random_points(
    shape: Sequence[int], *, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform points in [0, 1) of shape (*shape, 2), float32, on `device`.

    With a generator the draw happens on the generator's device, then moves to `device`.
    """
    size = (*shape, 2)
    if generator is None:
        return torch.rand(size, device=device)
    return torch.rand(size, generator=generator, device=generator.device).to(device)


PointSelector = Callable[[Tensor, Tensor, int], Tensor]
"""(coarse_logits (R, 1, h, w), candidates (R, K, 2), k) -> (R, k, 2): the k candidates where
each mask is most uncertain. `topk_uncertain_points` is the plain one; a replacement must keep
the same set (its order may differ)."""


def topk_uncertain_points(
    coarse_logits: Tensor,
    candidates: Tensor,
    k: int,
    *,
    uncertainty_fn: Callable[[Tensor], Tensor] = logit_uncertainty,
) -> Tensor:
    """The k of `candidates` (R, K, 2) with the highest `uncertainty_fn` of `coarse_logits`
    (R, 1, h, w) read there: (R, k, 2), in no particular order."""
    uncertainty = uncertainty_fn(point_sample(coarse_logits, candidates))  # (R, 1, K)
    # Unsorted: the losses sum over points, so only which points are kept matters (about
    # twice as fast as a sorted top-k on the CPU).
    top = torch.topk(uncertainty[:, 0, :], k=k, dim=1, sorted=False).indices
    return torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))


def uncertain_point_coords_with_randomness(
    coarse_logits: Tensor,
    *,
    uncertainty_fn: Callable[[Tensor], Tensor] = logit_uncertainty,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
    point_selector: PointSelector | None = None,
) -> Tensor:
    """Pick points where each mask is most uncertain, plus uniform random points.

    Draws `int(num_points * oversample_ratio)` uniform points per mask, keeps the
    `int(importance_sample_ratio * num_points)` of them with the highest `uncertainty_fn`, and
    fills up to `num_points` with fresh uniform points. The draws, in this order, are
    `(R, oversampled, 2)` then `(R, num_points - kept, 2)` uniform values from `generator`.
    Nothing is differentiable here; call it under `torch.no_grad()`.

    Args:
        coarse_logits: (R, 1, h, w) mask logits.
        uncertainty_fn: maps (R, 1, P) point logits to (R, 1, P) uncertainties.
        num_points: points P returned per mask.
        oversample_ratio: k >= 1, the candidate pool is k * P points.
        importance_sample_ratio: beta in [0, 1], the share of P chosen by uncertainty.
        generator: source of randomness (the global RNG when None).
        point_selector: picks the uncertain candidates by logit uncertainty, in place of
            `topk_uncertain_points` (e.g. `model.cpu_training.select_uncertain_points`); only
            with the default uncertainty_fn.

    Returns:
        (R, P, 2) points in [0, 1], (x, y) order; the first int(beta * P) are the uncertain ones
        (in no particular order).
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}; use 1 to disable")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    if point_selector is not None and uncertainty_fn is not logit_uncertainty:
        raise ValueError("point_selector ranks by logit uncertainty; pass either it or an "
                         "uncertainty_fn, not both")
    num_masks = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain

    candidates = random_points(
        (num_masks, num_sampled), device=coarse_logits.device, generator=generator
    )  # (R, kP, 2)
    if point_selector is None:
        chosen = topk_uncertain_points(coarse_logits, candidates, num_uncertain,
                                       uncertainty_fn=uncertainty_fn)
    else:
        chosen = point_selector(coarse_logits, candidates, num_uncertain)
    if num_random == 0:
        return chosen
    fill = random_points((num_masks, num_random), device=coarse_logits.device, generator=generator)
    return torch.cat([chosen, fill], dim=1)


def seeded_generators(
    *, seeds: Sequence[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One freshly seeded generator per seed (e.g. one per image and step).

    A CPU generator gives identical points on every device; a CUDA generator avoids the copy.
    """
    generators = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed))
        generators.append(g)
    return generators
