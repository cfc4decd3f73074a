"""MSDeformAttnPixelDecoder: a deformable-attention encoder over the coarse backbone levels,
then an FPN down to stride 4 producing the per-pixel mask embedding.

Module names follow the reference (`input_proj.0.0`, `transformer.level_embed`,
`transformer.encoder.layers.N.self_attn.sampling_offsets`, `adapter_1.norm`, `layer_1`,
`mask_features`) so that reference checkpoints map by prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.ops import ms_deform_attn
from model.position_encoding import sine_position_embedding
from model.tracing import cached_per_size


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), single reference point per query."""

    def __init__(self, *, dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Offsets start on rays around the reference point: head h points at angle 2*pi*h/nH,
        # point p at distance p + 1; attention starts uniform.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """query (B, Q, C); reference_points (1 or B, Q, 2) as (x, y) in [0, 1], shared by all
        levels; value (B, S, C); spatial_shapes (L, 2) int64 (h, w); level_start_index (L,).
        Returns (B, Q, C)."""
        B, Q, C = query.shape
        nH, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).view(B, value.shape[1], nH, C // nH)  # (B, S, nH, c)
        # One GEMM for both projections of the query.
        both = F.linear(query, torch.cat([self.sampling_offsets.weight,
                                          self.attention_weights.weight]),
                        torch.cat([self.sampling_offsets.bias, self.attention_weights.bias]))
        offsets, weights = both.split([nH * L * P * 2, nH * L * P], dim=-1)
        offsets = offsets.view(B, Q, nH, L, P, 2)
        weights = weights.reshape(B, Q, nH, L * P)
        weights = weights.softmax(-1).view(B, Q, nH, L, P)
        # float32 (w, h) per level: exact for any map size, also when offsets are bf16
        normalizer = spatial_shapes.flip(-1).to(reference_points.dtype)  # (L, 2)
        locations = torch.addcdiv(reference_points[:, :, None, None, None, :], offsets,
                                  normalizer[None, None, None, :, None, :])  # (B, Q, nH, L, P, 2)
        dtype = op_dtype(value.device.type, value.dtype)
        # No value check of spatial_shapes / level_start_index: on CUDA it would read them back
        # to the host (a synchronisation) in every layer. The encoder makes them from the maps'
        # shapes; the CPU kernel checks them anyway and the CUDA kernels never read outside value.
        out = ms_deform_attn(value.to(dtype), spatial_shapes, level_start_index,
                             locations.to(dtype), weights.to(dtype),
                             check_level_values=False)  # (B, Q, C)
        return self.output_proj(out)


def op_dtype(device_type: str, value_dtype: torch.dtype) -> torch.dtype:
    """The dtype handed to the deformable attention op.

    The CPU kernel computes in float32. On CUDA float16 is kept (its 11-bit significand keeps
    sampling locations within 1/2048 of the map); bfloat16 locations would be off by up to half
    a pixel on large maps, so the op gets float32 there.
    """
    if device_type == "cuda" and value_dtype == torch.float16:
        return torch.float16
    return value_dtype if value_dtype == torch.float64 else torch.float32


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN."""

    def __init__(self, *, self_attn: MSDeformAttn, dim: int, dim_feedforward: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor) -> Tensor:
        """src (B, S, C); pos (1, S, C). Returns (B, S, C)."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """A stack of encoder layers sharing one reference point per token (its pixel centre)."""

    def __init__(self, *, layers: list[MSDeformAttnEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """src (B, S, C); pos (1, S, C); shapes [(h, w)] per level. Returns (B, S, C)."""
        spatial_shapes, level_start_index, reference_points = _level_tensors(
            tuple(map(tuple, shapes)), src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)
        return src


@cached_per_size
def _level_tensors(shapes: tuple[tuple[int, int], ...],
                   device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """spatial_shapes (L, 2) int64 (h, w), level_start_index (L,) int64 and the reference
    points (1, S, 2) of levels `shapes`, made on `device` from Python numbers by fills rather
    than copied from host memory (on CUDA a copy from pageable memory synchronises)."""
    spatial_shapes = torch.empty((len(shapes), 2), dtype=torch.long, device=device)
    for lvl, (h, w) in enumerate(shapes):
        spatial_shapes[lvl, 0].fill_(h)
        spatial_shapes[lvl, 1].fill_(w)
    sizes = spatial_shapes.prod(1)
    level_start_index = sizes.cumsum(0) - sizes  # exclusive cumsum
    return spatial_shapes, level_start_index, _reference_points(shapes, device)


def _reference_points(shapes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """(1, S, 2) pixel centres (x, y) normalised to [0, 1], levels concatenated."""
    points = []
    for h, w in shapes:
        ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h
        xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w
        points.append(torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)), -1)
                      .reshape(h * w, 2))
    return torch.cat(points)[None]


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Level embeddings + the deformable encoder, over features ordered low to high resolution."""

    def __init__(self, *, encoder: MSDeformAttnEncoder, num_levels: int, dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor]) -> list[Tensor]:
        """srcs [(B, C, h_l, w_l)] -> the encoded maps, same shapes."""
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        B, C = srcs[0].shape[:2]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
        pos = torch.cat([
            sine_position_embedding(h, w, C // 2, device=flat.device, dtype=flat.dtype)
            + self.level_embed[lvl].to(flat.dtype)
            for lvl, (h, w) in enumerate(shapes)])[None]  # (1, S, C)
        memory = self.encoder(flat, pos, shapes)  # (B, S, C)
        maps = memory.split([h * w for h, w in shapes], dim=1)
        # channels_last views (B, C, h, w) of the (B, hw, C) rows: no copy here, and none when
        # the transformer decoder flattens them back.
        return [m.unflatten(1, (h, w)).permute(0, 3, 1, 2) for m, (h, w) in zip(maps, shapes)]


class ConvNorm(nn.Conv2d):
    """A Conv2d followed by a norm and an optional ReLU (detectron2's `Conv2d(norm=...)`)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, norm: nn.Module,
                 relu: bool) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size,
                         padding=kernel_size // 2, bias=False)
        self.norm = norm
        self.relu = relu
        nn.init.kaiming_uniform_(self.weight, a=1)  # c2_xavier_fill

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x, inplace=True) if self.relu else x


class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone features -> (mask features at the common stride, 3 multi-scale maps).

    in_features: all backbone levels, high to low resolution (res2..res5); the last
    `len(input_proj)` of them go through the deformable encoder, the rest through the FPN.
    """

    def __init__(self, *, in_features: list[str], input_proj: list[nn.Module],
                 transformer: MSDeformAttnTransformerEncoderOnly, lateral_convs: list[ConvNorm],
                 output_convs: list[ConvNorm], mask_features: nn.Conv2d) -> None:
        super().__init__()
        num_levels = len(input_proj)
        self.transformer_in_features = in_features[-num_levels:]
        self.fpn_in_features = in_features[:len(lateral_convs)]
        self.input_proj = nn.ModuleList(input_proj)  # [0] is the coarsest level
        self.transformer = transformer
        self.mask_features = mask_features
        # adapter_1 / layer_1 serve the finest FPN level, as in the reference.
        for idx, (lateral, output) in enumerate(zip(lateral_convs, output_convs)):
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
        self.num_fpn_levels = len(lateral_convs)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """features {name: (B, C_name, H/stride, W/stride)} ->
        mask_features (B, mask_dim, H/4, W/4) and 3 maps (B, conv_dim, h, w), coarsest first."""
        srcs = [proj(features[name]) for proj, name in
                zip(self.input_proj, reversed(self.transformer_in_features))]  # coarsest first
        out = self.transformer(srcs)
        for idx in reversed(range(self.num_fpn_levels)):  # coarse to fine
            lateral = getattr(self, f"adapter_{idx + 1}")(features[self.fpn_in_features[idx]])
            up = F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear",
                               align_corners=False)
            out.append(getattr(self, f"layer_{idx + 1}")(lateral + up))
        return self.mask_features(out[-1]), out[:3]
