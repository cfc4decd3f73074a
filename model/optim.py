"""The reference Mask2Former optimiser recipe: AdamW parameter groups, warmup + poly schedule,
and full-model gradient-norm clipping.

    groups = param_groups(net, lr=1e-4, weight_decay=0.05, backbone_lr_multiplier=0.1)
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    scheduler = warmup_poly_scheduler(optimizer, total_steps=90_000, warmup_steps=10)
    ...
    loss.backward()
    clip_grad_norm(net.parameters(), max_norm=0.01)
    optimizer.step(); scheduler.step()

Parameter groups follow facebookresearch/Mask2Former `train_net.py` (`build_optimizer`):

- every parameter whose module name contains "backbone" learns at `lr * backbone_lr_multiplier`;
- normalisation layers (BatchNorm, GroupNorm, LayerNorm, ...) get no weight decay;
- embeddings get no weight decay: every `nn.Embedding` (the decoder's `query_feat`,
  `query_embed` and `level_embed`) and Swin's `relative_position_bias_table` /
  `absolute_pos_embed`. The pixel decoder's `transformer.level_embed` is a plain parameter and
  keeps weight decay, as in the reference;
- everything else, biases included, gets `weight_decay`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
DEFAULT_LR = 1e-4
DEFAULT_WEIGHT_DECAY = 0.05
DEFAULT_BACKBONE_LR_MULTIPLIER = 0.1
WARMUP_START_FACTOR = 0.001  # lr multiplier at step 0 of the linear warmup (detectron2's)
POLY_POWER = 0.9


def param_groups(
    net: nn.Module,
    *,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    backbone_lr_multiplier: float = DEFAULT_BACKBONE_LR_MULTIPLIER,
) -> list[dict]:
    """AdamW parameter groups for `net` (a Mask2Former, possibly wrapped in DDP).

    Returns one group per distinct (lr, weight_decay) with keys "params", "lr",
    "weight_decay" and "names" (parameter names, for inspection; torch ignores the key).
    Frozen parameters (requires_grad False) and shared parameters after the first are left out.
    """
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in net.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            group_lr = lr * backbone_lr_multiplier if "backbone" in module_name else lr
            no_decay = (isinstance(module, NORM_TYPES) or isinstance(module, nn.Embedding)
                        or any(n in param_name for n in NO_DECAY_NAMES))
            group_wd = 0.0 if no_decay else weight_decay
            group = groups.setdefault((group_lr, group_wd), {
                "params": [], "names": [], "lr": group_lr, "weight_decay": group_wd})
            group["params"].append(param)
            group["names"].append(full_name)
    return list(groups.values())


def build_optimizer(
    net: nn.Module,
    *,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    backbone_lr_multiplier: float = DEFAULT_BACKBONE_LR_MULTIPLIER,
    adamw: type[torch.optim.AdamW] = torch.optim.AdamW,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(net, ...)` (betas (0.9, 0.999), eps 1e-8 as the reference).

    Uses torch's fused AdamW kernel (CPU and CUDA): the same update, ~4x faster than the
    per-parameter loop (tiny: 22 vs 106 ms a step on one CPU thread). `adamw`: the class, a
    torch.optim.AdamW or a subclass (CPU training: `model.cpu_training.ChannelsLastAdamW`).
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    groups = param_groups(net, lr=lr, weight_decay=weight_decay,
                          backbone_lr_multiplier=backbone_lr_multiplier)
    return adamw(groups, lr=lr, weight_decay=weight_decay, fused=True)


@dataclass(frozen=True)
class WarmupPoly:
    """lr multiplier at a step: linear warmup, then poly decay to 0 at `total_steps`.

    factor(s) = warmup(s) * (1 - s / total_steps) ** power, warmup(s) rising linearly from
    WARMUP_START_FACTOR at s = 0 to 1 at s = warmup_steps (detectron2's WarmupPolyLR).
    A picklable callable, so `LambdaLR.state_dict()` keeps it.
    """

    total_steps: int
    warmup_steps: int = 0
    power: float = POLY_POWER

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return 0.0
        warmup = 1.0
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            warmup = WARMUP_START_FACTOR * (1 - alpha) + alpha
        return warmup * (1 - step / self.total_steps) ** self.power


def warmup_poly_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
    power: float = POLY_POWER,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `WarmupPoly` to every group's own base lr; step it once per step."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    schedule = WarmupPoly(total_steps=total_steps, warmup_steps=warmup_steps, power=power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def clip_grad_norm(params: Iterable[Tensor], *, max_norm: float) -> Tensor:
    """Clip the gradients of all `params` together to total L2 norm `max_norm` (the reference's
    "full_model" clipping); returns the norm before clipping. max_norm <= 0 only measures."""
    params = [p for p in params if p.grad is not None]
    if max_norm <= 0:
        if not params:
            return torch.zeros(())
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, norm_type=2.0)
