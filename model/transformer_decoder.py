"""MultiScaleMaskedTransformerDecoder: object queries with masked cross-attention.

Each layer: masked cross-attention to one feature level (round-robin, coarsest first; the
mask is the previous prediction resized to that level, foreground = sigmoid >= 0.5), then
self-attention among queries, then an FFN. A prediction (class logits + mask logits) is made
from the learnable queries and after every layer.

Attention weights live in `nn.MultiheadAttention` modules (the reference's parameter names,
`in_proj_weight` / `out_proj`), but run batch-first through `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.position_encoding import sine_position_embedding

NUM_FEATURE_LEVELS = 3  # the reference always attends to 3 scales


def _attention(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
               allowed: Tensor | None) -> Tensor:
    """query (B, Lq, C), key / value (B, Lk, C), allowed (B, 1, Lq, Lk) bool or None.
    Returns (B, Lq, C)."""
    B, Lq, C = query.shape
    nH = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(B, Lq, nH, C // nH).transpose(1, 2)  # (B, nH, Lq, c)
    k = F.linear(key, w_k, b_k).view(B, -1, nH, C // nH).transpose(1, 2)  # (B, nH, Lk, c)
    v = F.linear(value, w_v, b_v).view(B, -1, nH, C // nH).transpose(1, 2)  # (B, nH, Lk, c)
    dropout = mha.dropout if mha.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
    return mha.out_proj(out.transpose(1, 2).reshape(B, Lq, C))


class SelfAttentionLayer(nn.Module):
    """Self-attention among queries with residual and LayerNorm (post- or pre-norm)."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """tgt (B, Q, C), query_pos (B, Q, C) -> (B, Q, C)."""
        x = self.norm(tgt) if self.pre_norm else tgt
        q = x + query_pos
        tgt = tgt + self.dropout(_attention(self.self_attn, q, q, x, None))
        return tgt if self.pre_norm else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from queries to one level's features."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                allowed: Tensor | None) -> Tensor:
        """tgt (B, Q, C); memory (B, HW, C); pos (1, HW, C); query_pos (B, Q, C);
        allowed (B, 1, Q, HW) bool (True = may attend) -> (B, Q, C)."""
        x = self.norm(tgt) if self.pre_norm else tgt
        out = _attention(self.multihead_attn, x + query_pos, memory + pos, memory, allowed)
        tgt = tgt + self.dropout(out)
        return tgt if self.pre_norm else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer ReLU MLP with residual and LayerNorm."""

    def __init__(self, *, dim: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor) -> Tensor:
        """(B, Q, C) -> (B, Q, C)."""
        x = self.norm(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x), inplace=True))))
        return tgt if self.pre_norm else self.norm(tgt)


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, *, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x, inplace=True)
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Queries -> per-layer class logits (B, Q, K+1) and mask logits (B, Q, H, W)."""

    def __init__(self, *, self_attention_layers: list[SelfAttentionLayer],
                 cross_attention_layers: list[CrossAttentionLayer], ffn_layers: list[FFNLayer],
                 input_proj: list[nn.Module], num_queries: int, hidden_dim: int,
                 class_embed: nn.Linear, mask_embed: MLP) -> None:
        super().__init__()
        self.transformer_self_attention_layers = nn.ModuleList(self_attention_layers)
        self.transformer_cross_attention_layers = nn.ModuleList(cross_attention_layers)
        self.transformer_ffn_layers = nn.ModuleList(ffn_layers)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # initial query content
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # query position embedding
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList(input_proj)
        self.class_embed = class_embed
        self.mask_embed = mask_embed

    def forward(self, features: list[Tensor], mask_features: Tensor, *,
                aux_outputs: bool = True) -> dict:
        """features: 3 maps (B, C_in, h_l, w_l), coarsest first; mask_features (B, D, H, W).

        Returns {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H, W),
        "aux_outputs": [{"pred_logits", "pred_masks"}] for the learnable queries and every
        layer but the last}.

        aux_outputs=False (inference: only the last prediction is used) returns an empty
        "aux_outputs" and skips the full-resolution masks of the earlier predictions: their
        attention masks come from `mask_features` resized to each level first. Resizing
        (bilinear) and the per-pixel dot product are both linear, so this is the same
        arithmetic in a different order (a mask logit within float rounding of 0 can land on
        the other side of the threshold), and ~10x fewer multiply-adds for the masks.
        """
        memories, positions, sizes = [], [], []
        for lvl, x in enumerate(features):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            src = self.input_proj[lvl](x).flatten(2).transpose(1, 2)  # (B, hw, C)
            memories.append(src + self.level_embed.weight[lvl].to(src.dtype))
            positions.append(sine_position_embedding(
                h, w, src.shape[-1] // 2, device=src.device, dtype=src.dtype)[None])  # (1, hw, C)

        B = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # (B, Q, C)
        output = self.query_feat.weight[None].expand(B, -1, -1)  # (B, Q, C)
        small_features = None if aux_outputs else [
            F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
            for size in sizes]  # (B, D, h_l, w_l) per level

        predictions = []  # full (class logits, mask logits) before each layer; aux only
        for i in range(len(self.transformer_cross_attention_layers)):
            lvl = i % NUM_FEATURE_LEVELS
            # Each layer attends where the prediction from its input queries says.
            if small_features is None:
                logits, masks = self._predict(output, mask_features)
                predictions.append((logits, masks))
                small = F.interpolate(masks, size=sizes[lvl], mode="bilinear",
                                      align_corners=False)
            else:
                small = _masks(self.mask_embed(self.decoder_norm(output)), small_features[lvl])
            allowed = _attention_mask(small)
            output = self.transformer_cross_attention_layers[i](
                output, memories[lvl], positions[lvl], query_pos, allowed)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
        logits, masks = self._predict(output, mask_features)
        return {
            "pred_logits": logits,
            "pred_masks": masks,
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions],
        }

    def _predict(self, output: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """output (B, Q, C) -> class logits (B, Q, K+1), mask logits (B, Q, H, W)."""
        x = self.decoder_norm(output)
        embed = self.mask_embed(x)  # (B, Q, D)
        return self.class_embed(x), _masks(embed, mask_features)


def _attention_mask(masks: Tensor) -> Tensor:
    """Mask logits (B, Q, h, w) -> cross-attention mask (B, 1, Q, h*w) bool, True = may attend."""
    # sigmoid >= 0.5, not logit >= 0: they differ for tiny negative logits in float.
    allowed = (masks.sigmoid().flatten(2) >= 0.5).detach()  # (B, Q, hw)
    # A query with an empty mask attends everywhere rather than nowhere.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def _masks(embed: Tensor, features: Tensor) -> Tensor:
    """embed (B, Q, D), features (B, D, H, W) -> mask logits (B, Q, H, W)."""
    B, D, H, W = features.shape
    return torch.bmm(embed, features.flatten(2)).view(B, -1, H, W)
