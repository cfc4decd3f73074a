"""Backbones: torchvision ResNet (frozen BatchNorm) and Swin, returning res2..res5.

Parameter names stay torchvision's (`conv1`, `layer1.0.conv2`, `features.1.0.attn.qkv`), so
torchvision / HF / detectron2 weights map onto them by renaming only. No weights are downloaded.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.swin_transformer import (
    ShiftedWindowAttention,
    SwinTransformer,
    SwinTransformerBlock,
)
from torchvision.ops import misc

from model.config import BackboneConfig

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class FrozenBatchNorm2d(misc.FrozenBatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters (all buffers, never trained).

    Runs PyTorch's eval-mode batch_norm kernel: the same arithmetic as an `nn.BatchNorm2d` in
    eval mode (torchvision's version rounds differently, which deep nets amplify).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class ResNetBackbone(nn.Module):
    """The convolutional trunk of a torchvision ResNet (no pooling head).

    forward: images (B, 3, H, W) -> {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}
    """

    def __init__(self, *, trunk: resnet.ResNet) -> None:
        super().__init__()
        # Adopt the trunk's children under their own names so keys read `backbone.layer1...`.
        self.conv1, self.bn1, self.relu, self.maxpool = (
            trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
        widths = [_block_out_channels(layer) for layer in (self.layer1, self.layer2,
                                                           self.layer3, self.layer4)]
        self.out_channels: dict[str, int] = dict(zip(FEATURE_NAMES, widths))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        # channels_last: oneDNN / cuDNN convolutions run without layout reorders, and the pixel
        # decoder's flatten(2).transpose(1, 2) of these maps becomes free.
        images = images.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, 64, H/4, W/4)
        res2 = self.layer1(x)
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        res5 = self.layer4(res4)
        return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}


def _block_out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if isinstance(last, resnet.Bottleneck) else last.bn2).weight.shape[0]


class AlwaysShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's window attention, but shifting even when a map fits in one window.

    The reference Swin (and HF's Swin backbone) always shift odd blocks, padding small maps to
    one window; torchvision skips the shift there, which changes outputs on small inputs.
    Same parameters as torchvision's; computed with scaled_dot_product_attention.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        (wh, ww), (sh, sw), nH = self.window_size, self.shift_size, self.num_heads
        x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))
        Hp, Wp = x.shape[1:3]
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nwh, nww, N = Hp // wh, Wp // ww, wh * ww
        windows = (x.view(B, nwh, wh, nww, ww, C).permute(0, 1, 3, 2, 4, 5)
                   .reshape(B * nwh * nww, N, C))  # (B*nW, N, C)
        qkv = F.linear(windows, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(-1, N, 3, nH, C // nH).permute(2, 0, 3, 1, 4)  # (B*nW, nH, N, c)
        bias = self.get_relative_position_bias().to(x.dtype)  # (1, nH, N, N)
        if sh or sw:
            shift_mask = _shift_mask(Hp, Wp, (wh, ww), (sh, sw), x.device, x.dtype)  # (nW, N, N)
            bias = (bias + shift_mask[:, None]).repeat(B, 1, 1, 1)  # (B*nW, nH, N, N)
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        out = F.linear(out.transpose(1, 2).reshape(-1, N, C), self.proj.weight, self.proj.bias)
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = (out.view(B, nwh, nww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
               .reshape(B, Hp, Wp, C))
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out[:, :H, :W]


def _shift_mask(Hp: int, Wp: int, window: tuple[int, int], shift: tuple[int, int],
                device: torch.device, dtype: torch.dtype) -> Tensor:
    """(num_windows, N, N) additive mask: -100 between tokens the cyclic shift made adjacent."""
    def regions(size: int, w: int, s: int) -> Tensor:
        idx = torch.arange(size, device=device)
        return (idx >= size - w).long() + (idx >= size - s).long()  # 0, 1, 2 per band

    (wh, ww), (sh, sw) = window, shift
    label = regions(Hp, wh, sh)[:, None] * 3 + regions(Wp, ww, sw)[None, :]  # (Hp, Wp)
    label = (label.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3)
             .reshape(-1, wh * ww))  # (nW, N)
    differs = label[:, None, :] != label[:, :, None]
    return torch.zeros(differs.shape, device=device, dtype=dtype).masked_fill(differs, -100.0)


class SwinBackbone(nn.Module):
    """torchvision Swin stages with a LayerNorm on each stage output (as detectron2's D2Swin).

    forward: images (B, 3, H, W) -> {"res2": (B, C, H/4, W/4), ..., "res5": (B, 8C, H/32, W/32)}
    with H, W multiples of 32 (the model pads inputs before the backbone). Outputs are in
    channels_last memory format (the ResNet's too).
    """

    def __init__(self, *, swin: SwinTransformer, embed_dim: int) -> None:
        super().__init__()
        # features: [patch embed, stage 1, merge, stage 2, merge, stage 3, merge, stage 4]
        self.features = swin.features
        for module in self.features.modules():
            index = getattr(module, "relative_position_index", None)
            if isinstance(index, Tensor):
                # Derived from the window size: rebuilt at construction, not kept in checkpoints.
                module.register_buffer("relative_position_index", index, persistent=False)
        widths = [embed_dim * 2**i for i in range(4)]
        self.norm0, self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(c) for c in widths)
        self.out_channels: dict[str, int] = dict(zip(FEATURE_NAMES, widths))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.features[0](images)  # (B, H/4, W/4, C) channels-last
        outputs = {}
        norms = (self.norm0, self.norm1, self.norm2, self.norm3)
        for i, name in enumerate(FEATURE_NAMES):
            if i > 0:
                x = self.features[2 * i](x)  # patch merging: (B, h/2, w/2, 2c)
            x = self.features[2 * i + 1](x)  # stage i: (B, h, w, c)
            outputs[name] = norms[i](x).permute(0, 3, 1, 2)  # (B, c, h, w), channels_last
        return outputs


def build_backbone(cfg: BackboneConfig) -> ResNetBackbone | SwinBackbone:
    """A randomly initialised backbone for `cfg` (no pretrained weights are fetched)."""
    if cfg.kind == "resnet":
        constructors = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50,
                        101: resnet.resnet101}
        if cfg.depth not in constructors:
            raise ValueError(f"unsupported ResNet depth {cfg.depth}; use one of "
                             f"{sorted(constructors)}")
        trunk = constructors[cfg.depth](weights=None, norm_layer=FrozenBatchNorm2d)
        return ResNetBackbone(trunk=trunk)
    if cfg.kind == "swin":
        swin = SwinTransformer(
            patch_size=[4, 4],
            embed_dim=cfg.embed_dim,
            depths=list(cfg.depths),
            num_heads=list(cfg.num_heads),
            window_size=[cfg.window_size, cfg.window_size],
            mlp_ratio=cfg.mlp_ratio,
            stochastic_depth_prob=cfg.drop_path_rate,
            block=functools.partial(SwinTransformerBlock,
                                    attn_layer=AlwaysShiftedWindowAttention),
        )
        return SwinBackbone(swin=swin, embed_dim=cfg.embed_dim)
    raise ValueError(f"unknown backbone kind {cfg.kind!r}; use 'resnet' or 'swin'")

