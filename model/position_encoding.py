"""Normalised 2-D sine position embeddings (DETR's PositionEmbeddingSine, normalize=True).

The embedding depends only on the feature map's size, so it is computed once per size (and
cached) rather than once per image: no padding mask is used, as in the reference at inference.
The cache (`model.tracing.cached_per_size`) keeps nothing while the model is traced
(`torch.compile`, `torch.export`, fake tensors), and serves inference and training alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.tracing import cached_per_size


def sine_position_embedding(height: int, width: int, num_feats: int, *, device: torch.device,
                            dtype: torch.dtype, temperature: float = 10000.0) -> Tensor:
    """(height * width, 2 * num_feats) embedding, rows in raster order, channels [y..., x...].

    Computed in float32 (as the reference) and cast to `dtype`; cached per size and device.
    """
    return _embedding(height, width, num_feats, torch.device(device), dtype, float(temperature))


@cached_per_size
def _embedding(height: int, width: int, num_feats: int, device: torch.device, dtype: torch.dtype,
               temperature: float) -> Tensor:
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = y / (y[-1:] + eps) * scale  # (H,)
    x = x / (x[-1:] + eps) * scale  # (W,)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_y = _interleave_sin_cos(y[:, None] / dim_t)  # (H, F)
    pos_x = _interleave_sin_cos(x[:, None] / dim_t)  # (W, F)
    pos = torch.cat((pos_y[:, None, :].expand(height, width, num_feats),
                     pos_x[None, :, :].expand(height, width, num_feats)), dim=-1)  # (H, W, 2F)
    return pos.reshape(height * width, 2 * num_feats).to(dtype)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """(N, F) angles -> (N, F) with sin on even channels and cos on odd ones."""
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)
