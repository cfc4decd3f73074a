"""The Mask2Former set loss: match queries to targets, then supervise classes and masks.

For each decoder layer's predictions (the last one, and every `aux_outputs` entry when deep
supervision is on) the criterion

1. matches queries to targets with the Hungarian matcher (per image, no gradient);
2. `loss_ce`: cross-entropy over K + 1 classes for every query, unmatched queries labelled
   "no object" (index K) and weighted `no_object_weight`;
3. `loss_mask` / `loss_dice`: sigmoid BCE (mean over points) and dice of every matched mask, at
   points chosen where the prediction is uncertain, summed over masks and divided by `num_masks`.

Aux layers give `loss_ce_0`, `loss_mask_0`, `loss_dice_0`, ... in decoder order. `total_loss`
applies the weights.

The matching is the host's part (scipy's Hungarian algorithm on the CPU); the rest runs on the
predictions' device. `match` does it alone and `forward(..., matches=...)` takes its result, so
the loss proper can be traced whole (`torch.compile(fullgraph=True)`, fake tensors).

Batch independence (for data-parallel training): with one generator per image, every image
draws its points from its own generator in a fixed order (per layer: matcher, then mask loss),
and with `num_masks` / `class_weight_sum` given as averages over workers, the loss of a batch is
the sum of the losses of its images. Splitting a batch across workers then gives the same
gradients as one worker with the whole batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.matcher import HungarianMatcher
from model.point_sampling import (
    PointSelector,
    point_sample,
    uncertain_point_coords_with_randomness,
)
from model.tracing import tracing

Matches = list[tuple[Tensor, Tensor]]
LOSS_NAMES = ("loss_ce", "loss_mask", "loss_dice")


# TODO(lead): move next to the other config dataclasses in model/config.py.
@dataclass(frozen=True)
class LossConfig:
    """Training loss and matching hyper-parameters (reference Mask2Former defaults)."""

    class_weight: float = 2.0  # weight of loss_ce, and of the class term of the matching cost
    mask_weight: float = 5.0  # weight of loss_mask (point BCE), and of its matching cost
    dice_weight: float = 5.0  # weight of loss_dice, and of its matching cost
    no_object_weight: float = 0.1  # CE weight of the "no object" class (reference eos_coef)
    num_points: int = 12544  # points per mask (112 * 112) for matching and the mask losses
    oversample_ratio: float = 3.0  # candidate points per chosen point in importance sampling
    importance_sample_ratio: float = 0.75  # share of the points chosen by uncertainty
    deep_supervision: bool = True  # also supervise every earlier decoder layer (aux_outputs)


def sigmoid_bce_loss(logits: Tensor, labels: Tensor, *, num_masks: Tensor) -> Tensor:
    """Sigmoid BCE of (M, P) point logits and labels: mean over points, sum / num_masks."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return bce.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, *, num_masks: Tensor) -> Tensor:
    """Dice loss 1 - (2|p t| + 1) / (|p| + |t| + 1) of (M, P) point logits and labels, summed
    over masks / num_masks."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class SetCriterion(nn.Module):
    """Mask2Former loss over the final and (optionally) every intermediate decoder prediction."""

    empty_weight: Tensor

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: Callable[..., Matches],
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        point_selector: PointSelector | None = None,
    ) -> None:
        """Args: K (classes without "no object"), the matcher, the LossConfig fields, and the
        importance sampling's `point_selector` (None: `topk_uncertain_points`; see
        `uncertain_point_coords_with_randomness`)."""
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {
            "loss_ce": class_weight,
            "loss_mask": mask_weight,
            "loss_dice": dice_weight,
        }
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.point_selector = point_selector
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def forward(
        self,
        outputs: dict,
        targets: Sequence[dict[str, Tensor]],
        *,
        num_masks: float | Tensor,
        class_weight_sum: float | Tensor | None = None,
        generators: Sequence[torch.Generator] | None = None,
        matches: Sequence[Matches] | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted loss terms for every supervised decoder layer.

        Args:
            outputs: "pred_logits" (B, Q, K + 1), "pred_masks" (B, Q, h, w) logits, and
                optionally "aux_outputs": a list of such pairs, earliest decoder layer first.
            targets: B dicts with "labels" (N_i,) int64 in [0, K) and "masks" (N_i, H, W) bool or
                float covering the same (padded) extent as pred_masks, at any resolution.
            num_masks: number of target masks in the batch, averaged over data-parallel workers
                (see `local_normalizers`); clamped here to >= 1.
            class_weight_sum: sum of the CE class weights of all queries, averaged over workers;
                None uses this batch's own sum (the reference: a weighted mean per worker).
            generators: B generators, one per image, for the random points (the global RNG when
                None). Consumed in the order: final layer, then aux layers 0, 1, ...; for each
                layer the matcher's points, then the mask loss points.
            matches: the assignments `match` made for these outputs and targets, one per
                supervised layer; the matcher is not run then (nor does anything leave the
                device), and the generators give only the mask loss points.

        Returns:
            {"loss_ce", "loss_mask", "loss_dice"} plus the same names suffixed "_0", "_1", ...
            for each aux layer; float32 scalars.
        """
        pred_logits = outputs["pred_logits"]
        self._check_targets(targets, batch_size=pred_logits.shape[0])
        device = pred_logits.device
        num_masks_t = torch.as_tensor(num_masks, dtype=torch.float32, device=device).clamp(min=1)
        weight_sum = (
            None
            if class_weight_sum is None
            else torch.as_tensor(class_weight_sum, dtype=torch.float32, device=device)
        )
        # Float masks on the predictions' device once, not once per layer in matcher and loss.
        targets = [{**t, "masks": t["masks"].to(device=device, dtype=torch.float32)}
                   for t in targets]
        layers = self._supervised_layers(outputs)
        if matches is not None and len(matches) != len(layers):
            raise ValueError(f"got matches for {len(matches)} layers but the outputs have "
                             f"{len(layers)} supervised layers; pass what `match` returned")
        losses = {}
        for i, (layer, suffix) in enumerate(layers):
            layer_losses = self._layer_losses(
                layer["pred_logits"],
                layer["pred_masks"],
                targets,
                num_masks=num_masks_t,
                class_weight_sum=weight_sum,
                generators=generators,
                matches=None if matches is None else matches[i],
            )
            losses.update({name + suffix: value for name, value in layer_losses.items()})
        return losses

    @torch.no_grad()
    def match(
        self,
        outputs: dict,
        targets: Sequence[dict[str, Tensor]],
        *,
        generators: Sequence[torch.Generator] | None = None,
    ) -> list[Matches]:
        """The matcher's assignment for every supervised layer (final first, then aux 0, 1,
        ...), for `forward(..., matches=...)`. This is the host step of the loss: the cost
        matrices go to the CPU for scipy. The generators give the matcher's points of every
        layer in turn (so its draws come in another order than in a plain `forward`)."""
        self._check_targets(targets, batch_size=outputs["pred_logits"].shape[0])
        return [self.matcher(layer["pred_logits"], layer["pred_masks"], targets,
                             generators=generators)
                for layer, _ in self._supervised_layers(outputs)]

    def _supervised_layers(self, outputs: dict) -> list[tuple[dict, str]]:
        layers = [(outputs, "")]
        if self.deep_supervision:
            layers += [(aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        return layers

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the terms returned by `forward` (aux terms share their base weight)."""
        total = 0.0
        for name, value in losses.items():
            base = re.sub(r"_\d+$", "", name)
            if base not in self.weight_dict:
                raise KeyError(f"no weight for loss term {name!r}; known terms: {LOSS_NAMES}")
            total = total + self.weight_dict[base] * value
        return total

    def local_normalizers(
        self, targets: Sequence[dict[str, Tensor]], *, num_queries: int
    ) -> Tensor:
        """This worker's (num_masks, class_weight_sum), to be averaged over workers.

        class_weight_sum counts each matched query (min(Q, N_i) per image) with weight 1 and
        every other query with `no_object_weight`, exactly the weights `loss_ce` normalises by.

        Returns:
            (2,) float64 CPU tensor.
        """
        num_masks = 0
        weight_sum = 0.0
        for target in targets:
            n = len(target["labels"])
            matched = min(num_queries, n)
            num_masks += n
            weight_sum += matched + self.no_object_weight * (num_queries - matched)
        return torch.tensor([num_masks, weight_sum], dtype=torch.float64)

    def _layer_losses(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: Sequence[dict[str, Tensor]],
        *,
        num_masks: Tensor,
        class_weight_sum: Tensor | None,
        generators: Sequence[torch.Generator] | None,
        matches: Matches | None,
    ) -> dict[str, Tensor]:
        """loss_ce, loss_mask, loss_dice of one decoder layer; computed in float32."""
        if matches is None:
            matches = self.matcher(pred_logits, pred_masks, targets, generators=generators)
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            loss_ce = self._class_loss(
                pred_logits.float(), targets, matches, class_weight_sum=class_weight_sum
            )
            loss_mask, loss_dice = self._mask_losses(
                pred_masks.float(), targets, matches, num_masks=num_masks, generators=generators
            )
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}

    def _class_loss(
        self,
        logits: Tensor,
        targets: Sequence[dict[str, Tensor]],
        matches: Matches,
        *,
        class_weight_sum: Tensor | None,
    ) -> Tensor:
        """Weighted CE over (B, Q) queries; unmatched queries target "no object" (K)."""
        batch_size, num_queries, _ = logits.shape
        target_classes = torch.full(
            (batch_size, num_queries), self.num_classes, dtype=torch.int64, device=logits.device
        )
        for i, (query_idx, target_idx) in enumerate(matches):
            target_classes[i, query_idx.to(logits.device)] = targets[i]["labels"].to(
                logits.device
            )[target_idx.to(logits.device)]
        nll = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")  # (B, Q)
        weights = self.empty_weight[target_classes]  # (B, Q)
        normaliser = weights.sum() if class_weight_sum is None else class_weight_sum
        return (weights * nll).sum() / normaliser

    def _mask_losses(
        self,
        masks: Tensor,
        targets: Sequence[dict[str, Tensor]],
        matches: Matches,
        *,
        num_masks: Tensor,
        generators: Sequence[torch.Generator] | None,
    ) -> tuple[Tensor, Tensor]:
        """Point BCE and dice of the matched masks, each summed over masks / num_masks."""
        point_logits, point_labels = [], []
        for i, (query_idx, target_idx) in enumerate(matches):
            if query_idx.numel() == 0:
                continue
            pred = masks[i, query_idx.to(masks.device)].unsqueeze(1)  # (M_i, 1, h, w)
            with torch.no_grad():
                coords = uncertain_point_coords_with_randomness(
                    pred.detach(),
                    num_points=self.num_points,
                    oversample_ratio=self.oversample_ratio,
                    importance_sample_ratio=self.importance_sample_ratio,
                    generator=None if generators is None else generators[i],
                    point_selector=self.point_selector,
                )  # (M_i, P, 2)
                target = targets[i]["masks"][target_idx.to(targets[i]["masks"].device)]
                target = target.unsqueeze(1).to(device=masks.device, dtype=torch.float32)
                point_labels.append(point_sample(target, coords).squeeze(1))  # (M_i, P)
            point_logits.append(point_sample(pred, coords).squeeze(1))  # (M_i, P)
        if not point_logits:
            # Keep the graph connected so data-parallel training sees a gradient for every
            # parameter even when no image of this batch has a target.
            zero = masks.sum() * 0.0
            return zero, zero.clone()
        logits = torch.cat(point_logits)
        labels = torch.cat(point_labels)
        return (
            sigmoid_bce_loss(logits, labels, num_masks=num_masks),
            dice_loss(logits, labels, num_masks=num_masks),
        )

    def _check_targets(self, targets: Sequence[dict[str, Tensor]], *, batch_size: int) -> None:
        """Raise a one-sentence error for targets that do not fit the predictions."""
        if len(targets) != batch_size:
            raise ValueError(
                f"got {len(targets)} targets for a batch of {batch_size} images; pass one per image"
            )
        for i, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"target {i}: masks of shape {tuple(masks.shape)} do not match "
                    f"{labels.shape[0]} labels; give one (H, W) mask per label"
                )
            if tracing():  # the label range is a value check: the eager run makes it
                continue
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"target {i}: labels must be contiguous class indices in "
                    f"[0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}; "
                    "map dataset category ids to indices first"
                )


def build_criterion(config: LossConfig, *, num_classes: int,
                    point_selector: PointSelector | None = None) -> SetCriterion:
    """SetCriterion with a matcher whose costs equal the loss weights (the reference setup).

    point_selector: how the mask losses pick their uncertain points (None: plain PyTorch; CPU
    training passes `model.cpu_training.select_uncertain_points`)."""
    matcher = HungarianMatcher(
        cost_class=config.class_weight,
        cost_mask=config.mask_weight,
        cost_dice=config.dice_weight,
        num_points=config.num_points,
    )
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        class_weight=config.class_weight,
        mask_weight=config.mask_weight,
        dice_weight=config.dice_weight,
        no_object_weight=config.no_object_weight,
        num_points=config.num_points,
        oversample_ratio=config.oversample_ratio,
        importance_sample_ratio=config.importance_sample_ratio,
        deep_supervision=config.deep_supervision,
        point_selector=point_selector,
    )
