"""Mask2Former configuration: typed dataclasses, the label space, and named presets.

A config fully describes an architecture and its label space, so that a bundle's `config.json`
plus its weights rebuild the same model. Presets follow the reference Mask2Former configs
(facebookresearch/Mask2Former `configs/coco/panoptic-segmentation/*.yaml`).

    cfg = get_config("r50-coco-panoptic")
    cfg = dataclasses.replace(cfg, categories=my_categories)      # fine-tune on new labels
    assert Mask2FormerConfig.from_dict(cfg.to_dict()) == cfg
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Category:
    """One class of the label space, as in COCO panoptic's `categories` list."""

    id: int  # dataset category id written to outputs (COCO panoptic ids are 1..200, not dense)
    name: str  # human readable name
    isthing: bool  # True: countable object (instances); False: amorphous stuff region
    color: tuple[int, int, int]  # RGB colour for visualisations


@dataclass(frozen=True)
class BackboneConfig:
    """Feature extractor producing res2..res5 (strides 4, 8, 16, 32)."""

    kind: str = "resnet"  # "resnet" (torchvision ResNet, frozen BN) or "swin" (torchvision Swin)
    depth: int = 50  # resnet only: 18, 34, 50 or 101
    embed_dim: int = 96  # swin only: channels of the first stage (doubles per stage)
    depths: tuple[int, ...] = (2, 2, 6, 2)  # swin only: transformer blocks per stage
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # swin only: attention heads per stage
    window_size: int = 7  # swin only: side of the square attention window
    mlp_ratio: float = 4.0  # swin only: MLP hidden size / channels
    drop_path_rate: float = 0.0  # swin only: stochastic depth at the last block (training only)


@dataclass(frozen=True)
class PixelDecoderConfig:
    """MSDeformAttnPixelDecoder: deformable encoder over coarse levels + FPN up to stride 4."""

    in_features: tuple[str, ...] = ("res3", "res4", "res5")  # levels fed to the encoder
    conv_dim: int = 256  # channels of the encoder and FPN features
    mask_dim: int = 256  # channels of the per-pixel mask embedding
    norm_groups: int = 32  # GroupNorm groups for projections and FPN convs
    num_layers: int = 6  # deformable encoder layers
    num_heads: int = 8  # deformable attention heads
    num_points: int = 4  # sampling points per head and level
    dim_feedforward: int = 1024  # encoder FFN hidden size
    dropout: float = 0.0  # encoder dropout (training only)
    common_stride: int = 4  # stride of the mask features (FPN goes down to this stride)


@dataclass(frozen=True)
class TransformerDecoderConfig:
    """MultiScaleMaskedTransformerDecoder: queries attend to masked multi-scale features."""

    hidden_dim: int = 256  # query / attention width
    num_queries: int = 100  # learnable object queries
    num_heads: int = 8  # attention heads (self and cross)
    dim_feedforward: int = 2048  # FFN hidden size
    num_layers: int = 9  # decoder layers; predictions = num_layers + 1 (reference DEC_LAYERS - 1)
    pre_norm: bool = False  # LayerNorm before (True) or after (False) each sub-layer
    enforce_input_project: bool = False  # 1x1 conv on decoder inputs even when widths match
    dropout: float = 0.0  # attention / FFN dropout (training only)


@dataclass(frozen=True)
class InferenceConfig:
    """Test-time settings used by post-processing and by callers resizing inputs."""

    object_mask_threshold: float = 0.8  # drop queries whose class score is not above this
    overlap_threshold: float = 0.8  # drop segments keeping less than this share of their mask
    min_size: int = 800  # resize shortest edge to this before inference
    max_size: int = 1333  # ... unless the longest edge would exceed this


@dataclass(frozen=True)
class Mask2FormerConfig:
    """Everything needed to build a Mask2Former and interpret its outputs."""

    name: str  # preset or user-given name, informative only
    categories: tuple[Category, ...]  # label space; class index k <-> categories[k]
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    transformer_decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)  # RGB, 0..255 scale
    size_divisibility: int = 32  # inputs are zero-padded (after normalising) to a multiple

    def __post_init__(self) -> None:
        if not self.categories:
            raise ValueError("config needs at least one category")
        ids = [c.id for c in self.categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"category ids must be unique, got duplicates in {ids}")
        td, pd = self.transformer_decoder, self.pixel_decoder
        if td.hidden_dim % td.num_heads:
            raise ValueError(f"hidden_dim {td.hidden_dim} not divisible by {td.num_heads} heads")
        if pd.conv_dim % pd.num_heads:
            raise ValueError(f"conv_dim {pd.conv_dim} not divisible by {pd.num_heads} heads")

    @property
    def num_classes(self) -> int:
        """K, the number of real classes (the model predicts K + 1 with "no object")."""
        return len(self.categories)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mask2FormerConfig:
        """Inverse of `to_dict`; raises ValueError naming any unknown key."""
        return _from_dict(cls, data, "")


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config{path or ''}: expected an object for {cls.__name__}, "
                         f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path.lstrip(".") or cls.__name__
        raise ValueError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        return bool(value)
    if tp is float:
        return float(value)
    return value


# ----------------------------------------------------------------------------------- presets

_COCO_JSON = Path(__file__).with_name("coco_panoptic_categories.json")


def coco_panoptic_categories() -> tuple[Category, ...]:
    """The 133 COCO panoptic categories (80 things, 53 stuff) in contiguous-index order."""
    rows = json.loads(_COCO_JSON.read_text())
    return tuple(
        Category(id=r["id"], name=r["name"], isthing=bool(r["isthing"]), color=tuple(r["color"]))
        for r in rows
    )


def _coco(name: str, backbone: BackboneConfig, num_queries: int = 100) -> Mask2FormerConfig:
    return Mask2FormerConfig(
        name=name,
        categories=coco_panoptic_categories(),
        backbone=backbone,
        transformer_decoder=TransformerDecoderConfig(num_queries=num_queries),
    )


def _swin(embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...],
          window_size: int) -> BackboneConfig:
    return BackboneConfig(kind="swin", embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                          window_size=window_size, drop_path_rate=0.3)


def _tiny() -> Mask2FormerConfig:
    keep = {"person", "bicycle", "car", "dog", "tree-merged", "sky-other-merged",
            "grass-merged", "building-other-merged"}
    return Mask2FormerConfig(
        name="tiny",
        categories=tuple(c for c in coco_panoptic_categories() if c.name in keep),
        backbone=BackboneConfig(kind="resnet", depth=18),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, norm_groups=8, num_layers=2,
                                         num_heads=4, num_points=4, dim_feedforward=128),
        transformer_decoder=TransformerDecoderConfig(hidden_dim=64, num_queries=16, num_heads=4,
                                                     dim_feedforward=128, num_layers=3),
        inference=InferenceConfig(min_size=384, max_size=640),
    )


# Reference: configs/coco/panoptic-segmentation/{maskformer2_R50_bs16_50ep, maskformer2_R101_...,
# swin/maskformer2_swin_{tiny,small}_bs16_50ep, swin/maskformer2_swin_{base,large}_IN21k_384_...}.
PRESETS: dict[str, Mask2FormerConfig] = {
    "r50-coco-panoptic": _coco("r50-coco-panoptic", BackboneConfig(kind="resnet", depth=50)),
    "r101-coco-panoptic": _coco("r101-coco-panoptic", BackboneConfig(kind="resnet", depth=101)),
    "swin-t-coco-panoptic": _coco("swin-t-coco-panoptic",
                                  _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 7)),
    "swin-s-coco-panoptic": _coco("swin-s-coco-panoptic",
                                  _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 7)),
    "swin-b-coco-panoptic": _coco("swin-b-coco-panoptic",
                                  _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 12)),
    "swin-l-coco-panoptic": _coco("swin-l-coco-panoptic",
                                  _swin(192, (2, 2, 18, 2), (6, 12, 24, 48), 12), num_queries=200),
    "tiny": _tiny(),
}


def get_config(name: str) -> Mask2FormerConfig:
    """The preset called `name`; raises KeyError listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
