"""The assembled Mask2Former and `build_model`.

    net = build_model("r50-coco-panoptic")        # random weights
    out = net(images)                             # images (B, 3, H, W) float RGB 0..255
    out = net(images, aux_outputs=False)          # inference: the last prediction only

Parameter names (state-dict keys) follow the reference detectron2 checkpoints where the module
is the same, and torchvision's inside the backbone:

    backbone.conv1 / bn1 / layer{1-4}.N.conv{1-3} / bn{1-3} / downsample.{0,1}   ResNet
    backbone.features.*, backbone.norm{0-3}                                    Swin (torchvision)
    sem_seg_head.pixel_decoder.
        input_proj.{L}.{0: Conv2d, 1: GroupNorm}          L = 0 is the coarsest level (res5)
        transformer.level_embed                           (L, C)
        transformer.encoder.layers.N.self_attn.{sampling_offsets,attention_weights,
                                                value_proj,output_proj}
        transformer.encoder.layers.N.{norm1,linear1,linear2,norm2}
        adapter_1.{weight,norm.*}, layer_1.{weight,norm.*}   FPN on res2 (no conv bias)
        mask_features                                     1x1 conv to mask_dim
    sem_seg_head.predictor.
        query_feat, query_embed, level_embed              nn.Embedding (.weight)
        input_proj.{0,1,2}                                 Conv2d, or empty when not needed
        transformer_self_attention_layers.N.{self_attn.in_proj_weight/bias, self_attn.out_proj,
                                             norm}
        transformer_cross_attention_layers.N.{multihead_attn.in_proj_weight/bias,
                                              multihead_attn.out_proj, norm}
        transformer_ffn_layers.N.{linear1,linear2,norm}
        decoder_norm, class_embed, mask_embed.layers.{0,1,2}

Differences from a detectron2 checkpoint: the backbone (torchvision names, FrozenBatchNorm2d
without `num_batches_tracked`), and `pixel_mean` / `pixel_std` are not saved (they are config).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbone import FEATURE_NAMES, FEATURE_STRIDES, build_backbone
from model.config import Mask2FormerConfig, PixelDecoderConfig, TransformerDecoderConfig, get_config
from model.pixel_decoder import (
    ConvNorm,
    MSDeformAttn,
    MSDeformAttnEncoder,
    MSDeformAttnEncoderLayer,
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoderOnly,
)
from model.transformer_decoder import (
    MLP,
    NUM_FEATURE_LEVELS,
    CrossAttentionLayer,
    FFNLayer,
    MultiScaleMaskedTransformerDecoder,
    SelfAttentionLayer,
)


class MaskFormerHead(nn.Module):
    """Pixel decoder + transformer decoder (the reference's `sem_seg_head`)."""

    def __init__(self, *, pixel_decoder: MSDeformAttnPixelDecoder,
                 predictor: MultiScaleMaskedTransformerDecoder) -> None:
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, features: dict[str, Tensor], *, aux_outputs: bool = True) -> dict:
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.predictor(multi_scale, mask_features, aux_outputs=aux_outputs)


class Mask2Former(nn.Module):
    """Images (B, 3, H, W) RGB 0..255 -> per-query class and mask logits.

    Inputs are normalised, then zero-padded at the bottom / right to a multiple of
    `size_divisibility`; masks come out at 1/4 of the padded size.
    """

    def __init__(self, *, config: Mask2FormerConfig, backbone: nn.Module,
                 sem_seg_head: MaskFormerHead) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: Tensor, *, aux_outputs: bool = True) -> dict:
        """images (B, 3, H, W) float, RGB 0..255. Returns
        pred_logits (B, Q, K+1), pred_masks (B, Q, H_pad/4, W_pad/4), and aux_outputs: the same
        pair for every earlier prediction (learnable queries first).

        aux_outputs=False is for inference, where only the last prediction counts: the earlier
        ones are not made at full resolution and "aux_outputs" is an empty list (see
        `MultiScaleMaskedTransformerDecoder.forward`). Training or inference is this argument
        and `self.training` (dropout, drop path), never the autograd mode, so one forward
        serves eager, `torch.compile(fullgraph=True)` and `torch.export`.

        Dtypes: the logits and masks come out in the parameters' dtype, or under autocast in
        its dtype (the class head and the mask product are autocast matmuls); callers that
        need float32 (post-processing, the loss) convert. Under CUDA autocast the pixel
        decoder runs its convolutions and linear layers in the autocast dtype and the
        deformable attention op gets float16 under float16 autocast and float32 under
        bfloat16 (`model.pixel_decoder.op_dtype`). The forward creates tensors on the
        images' device only and never reads a value back to the host."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = (images - self.pixel_mean) / self.pixel_std
        d = self.config.size_divisibility
        pad_h, pad_w = -x.shape[2] % d, -x.shape[3] % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros after normalising, as the reference
        features = self.backbone(x)
        return self.sem_seg_head(features, aux_outputs=aux_outputs)


# ---------------------------------------------------------------------------------- builders

def build_pixel_decoder(cfg: PixelDecoderConfig,
                        in_channels: dict[str, int]) -> MSDeformAttnPixelDecoder:
    """The pixel decoder for backbone levels `in_channels` ({"res2": C2, ...})."""
    d = cfg.conv_dim
    unknown = set(cfg.in_features) - set(FEATURE_NAMES)
    if unknown:
        raise ValueError(f"pixel_decoder.in_features {sorted(unknown)} are not backbone levels "
                         f"{list(FEATURE_NAMES)}")
    levels = sorted(cfg.in_features, key=FEATURE_STRIDES.get)  # fine to coarse
    if levels != list(FEATURE_NAMES[-len(levels):]):
        raise ValueError(f"pixel_decoder.in_features must be the coarsest levels, got {levels}")
    input_proj = []
    for name in reversed(levels):  # coarsest first
        proj = nn.Sequential(nn.Conv2d(in_channels[name], d, kernel_size=1),
                             nn.GroupNorm(cfg.norm_groups, d))
        nn.init.xavier_uniform_(proj[0].weight)
        nn.init.zeros_(proj[0].bias)
        input_proj.append(proj)
    layers = []
    for _ in range(cfg.num_layers):
        attn = MSDeformAttn(dim=d, num_heads=cfg.num_heads, num_levels=len(levels),
                            num_points=cfg.num_points)
        layer = MSDeformAttnEncoderLayer(self_attn=attn, dim=d,
                                         dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout)
        nn.init.xavier_uniform_(layer.linear1.weight)
        nn.init.xavier_uniform_(layer.linear2.weight)
        layers.append(layer)
    transformer = MSDeformAttnTransformerEncoderOnly(
        encoder=MSDeformAttnEncoder(layers=layers), num_levels=len(levels), dim=d)
    fpn_levels = [n for n in FEATURE_NAMES
                  if cfg.common_stride <= FEATURE_STRIDES[n] < FEATURE_STRIDES[levels[0]]]
    lateral = [ConvNorm(in_channels[n], d, kernel_size=1, norm=nn.GroupNorm(cfg.norm_groups, d),
                        relu=False) for n in fpn_levels]
    output = [ConvNorm(d, d, kernel_size=3, norm=nn.GroupNorm(cfg.norm_groups, d), relu=True)
              for _ in fpn_levels]
    if len(levels) + len(fpn_levels) < NUM_FEATURE_LEVELS:
        raise ValueError("the pixel decoder must produce at least 3 feature maps; add levels to "
                         "pixel_decoder.in_features or lower common_stride")
    mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=1)
    nn.init.kaiming_uniform_(mask_features.weight, a=1)
    nn.init.zeros_(mask_features.bias)
    return MSDeformAttnPixelDecoder(
        in_features=[n for n in FEATURE_NAMES if FEATURE_STRIDES[n] >= cfg.common_stride],
        input_proj=input_proj, transformer=transformer, lateral_convs=lateral,
        output_convs=output, mask_features=mask_features)


def build_transformer_decoder(cfg: TransformerDecoderConfig, *, in_channels: int, mask_dim: int,
                              num_classes: int) -> MultiScaleMaskedTransformerDecoder:
    """The masked-attention decoder over `in_channels`-wide features."""
    d = cfg.hidden_dim
    common = dict(dim=d, dropout=cfg.dropout, pre_norm=cfg.pre_norm)
    self_layers = [SelfAttentionLayer(num_heads=cfg.num_heads, **common)
                   for _ in range(cfg.num_layers)]
    cross_layers = [CrossAttentionLayer(num_heads=cfg.num_heads, **common)
                    for _ in range(cfg.num_layers)]
    ffn_layers = [FFNLayer(dim_feedforward=cfg.dim_feedforward, **common)
                  for _ in range(cfg.num_layers)]
    for layer in (*self_layers, *cross_layers, *ffn_layers):
        for p in layer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    input_proj: list[nn.Module] = []
    for _ in range(NUM_FEATURE_LEVELS):
        if in_channels != d or cfg.enforce_input_project:
            conv = nn.Conv2d(in_channels, d, kernel_size=1)
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
            input_proj.append(conv)
        else:
            input_proj.append(nn.Sequential())
    return MultiScaleMaskedTransformerDecoder(
        self_attention_layers=self_layers, cross_attention_layers=cross_layers,
        ffn_layers=ffn_layers, input_proj=input_proj, num_queries=cfg.num_queries,
        hidden_dim=d, class_embed=nn.Linear(d, num_classes + 1),
        mask_embed=MLP(dims=[d, d, d, mask_dim]))


def build_model(config: str | Mask2FormerConfig) -> Mask2Former:
    """A Mask2Former with random weights from a preset name or a config; in eval mode."""
    cfg = get_config(config) if isinstance(config, str) else config
    backbone = build_backbone(cfg.backbone)
    pixel_decoder = build_pixel_decoder(cfg.pixel_decoder, backbone.out_channels)
    predictor = build_transformer_decoder(cfg.transformer_decoder,
                                          in_channels=cfg.pixel_decoder.conv_dim,
                                          mask_dim=cfg.pixel_decoder.mask_dim,
                                          num_classes=cfg.num_classes)
    head = MaskFormerHead(pixel_decoder=pixel_decoder, predictor=predictor)
    net = Mask2Former(config=cfg, backbone=backbone, sem_seg_head=head)
    # Convolution weights in the channels_last layout of the activations: otherwise every
    # convolution reorders its weight in the forward and its weight gradient in the backward.
    # (Loading a state dict copies into these tensors and keeps the layout.)
    return net.to(memory_format=torch.channels_last).eval()
