"""Hungarian matching of predicted queries to ground-truth segments, one image at a time.

The cost of giving query q the target t is

    cost_class * (-p_q(label_t)) + cost_mask * BCE(m_q, m_t) + cost_dice * dice(m_q, m_t)

where p_q is the softmax over K + 1 classes and both mask terms are read at the same uniform random
points for every query and target of the image. `scipy.optimize.linear_sum_assignment` then picks
the assignment of minimal total cost; queries left over are "no object".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from model.point_sampling import point_sample, random_points

NON_FINITE_COST = (
    "non-finite matching cost: the model produced NaN/inf logits; "
    "lower the learning rate or check the input data"
)


def pairwise_sigmoid_bce(logits: Tensor, targets: Tensor, *, probs: Tensor | None = None) -> Tensor:
    """(Q, N) mean sigmoid BCE of (Q, P) logits against (N, P) targets in [0, 1], same points.

    `probs`: sigmoid(logits), when the caller has it (the dice cost needs it too).
    """
    num_points = logits.shape[1]
    if probs is None:
        probs = logits.sigmoid()
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x) = softplus(x) - t * x, since
    # softplus(-x) = softplus(x) - x: one matmul and a row sum of softplus(x) = BCE(x, 0)
    # instead of a Q x N x P tensor. softplus(x) = relu(x) - log(sigmoid(|x|)), and
    # sigmoid(|x|) = max(p, 1 - p) = 0.5 + |p - 0.5|: from the probabilities, about 40% cheaper
    # than a softplus pass on the CPU, within float rounding of it (1e-7 a point).
    neg = (logits.clamp_min(0).sum(-1, keepdim=True)
           - torch.log((probs - 0.5).abs().add_(0.5)).sum(-1, keepdim=True))
    return (neg - logits @ targets.T) / num_points


def pairwise_dice(logits: Tensor, targets: Tensor, *, probs: Tensor | None = None) -> Tensor:
    """(Q, N) dice loss 1 - (2|p t| + 1) / (|p| + |t| + 1) of (Q, P) logits and (N, P) targets.

    `probs`: sigmoid(logits), when the caller has it.
    """
    if probs is None:
        probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the class + mask + dice cost."""

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        """Args: weights of the three cost terms, and the points P read per mask (112 * 112)."""
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0; give at least one a positive weight")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def cost_matrix(
        self,
        *,
        logits: Tensor,
        masks: Tensor,
        target_labels: Tensor,
        target_masks: Tensor,
        point_coords: Tensor,
    ) -> Tensor:
        """Matching cost of one image, in float32.

        Args:
            logits: (Q, K + 1) class logits.
            masks: (Q, h, w) mask logits.
            target_labels: (N,) int64 class indices in [0, K).
            target_masks: (N, H, W) bool or float masks over the same extent as `masks`.
            point_coords: (P, 2) points in [0, 1], (x, y) order, shared by predictions and targets.

        Returns:
            (Q, N) costs.
        """
        with torch.autocast(device_type=masks.device.type, enabled=False):
            probs = logits.float().softmax(-1)  # (Q, K + 1)
            cost_class = -probs[:, target_labels]  # (Q, N)
            points = point_coords[None].float()  # (1, P, 2)
            # Masks as channels: one grid_sample call reads every mask at the same points.
            pred_points = point_sample(masks[None].float(), points)[0]  # (Q, P)
            target_points = point_sample(
                target_masks[None].to(device=masks.device, dtype=torch.float32), points
            )[0]  # (N, P)
            probs_points = pred_points.sigmoid()
            cost_mask = pairwise_sigmoid_bce(pred_points, target_points, probs=probs_points)
            cost_dice = pairwise_dice(pred_points, target_points, probs=probs_points)
        return (
            self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice
        )

    @torch.no_grad()
    def forward(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: Sequence[dict[str, Tensor]],
        *,
        generators: Sequence[torch.Generator] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Image i draws its P points as `random_points((P,), generator=generators[i])`; images
        without targets draw nothing. Runs in float32 even under autocast.

        Args:
            pred_logits: (B, Q, K + 1) class logits.
            pred_masks: (B, Q, h, w) mask logits.
            targets: B dicts with "labels" (N_i,) int64 and "masks" (N_i, H, W).
            generators: B generators, one per image (the global RNG when None).

        Returns:
            B pairs (query_idx, target_idx) of int64 CPU tensors of length min(Q, N_i); query_idx
            is sorted ascending.
        """
        batch_size = pred_logits.shape[0]
        if generators is not None and len(generators) != batch_size:
            raise ValueError(
                f"got {len(generators)} generators for a batch of {batch_size}; pass one per image"
            )
        device = pred_masks.device
        matches = []
        for i, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            points = random_points(
                (self.num_points,),
                device=device,
                generator=None if generators is None else generators[i],
            )
            cost = self.cost_matrix(
                logits=pred_logits[i],
                masks=pred_masks[i],
                target_labels=labels.to(device),
                target_masks=target["masks"],
                point_coords=points,
            ).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(NON_FINITE_COST)
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append((torch.from_numpy(rows).long(), torch.from_numpy(cols).long()))
        return matches
