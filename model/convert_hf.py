"""Import a Hugging Face `Mask2FormerForUniversalSegmentation` checkpoint.

    cfg, state_dict = convert_hf("path/to/save_pretrained_folder")
    net = build_model(cfg); net.load_state_dict(state_dict)

The folder holds `config.json` and `model.safetensors` (as written by `save_pretrained` or
downloaded from the Hub; older `pytorch_model.bin` files are read tensors-only), optionally
`preprocessor_config.json` (pixel mean / std). Backbones:
HF ResNet (mapped onto torchvision's ResNet: stride in the 3x3 conv, i.e.
`downsample_in_bottleneck=False`) and HF Swin (mapped onto torchvision's Swin).

Key map (HF `model.` prefix dropped; see model/mask2former.py for our names):

    pixel_level_module.decoder.input_projections.L.*    -> sem_seg_head.pixel_decoder.input_proj.L.*
    pixel_level_module.decoder.level_embed              -> ...pixel_decoder.transformer.level_embed
    pixel_level_module.decoder.encoder.layers.N.{self_attn, self_attn_layer_norm, fc1, fc2,
        final_layer_norm}   -> ...transformer.encoder.layers.N.{self_attn, norm1, linear1, linear2,
        norm2}
    pixel_level_module.decoder.adapter_1.{0,1} / layer_1.{0,1}  -> adapter_1 / adapter_1.norm ...
    pixel_level_module.decoder.mask_projection          -> ...pixel_decoder.mask_features
    transformer_module.queries_features / queries_embedder -> predictor.query_feat / query_embed
    transformer_module.decoder.layers.N.self_attn.{q,k,v}_proj -> (concatenated)
        predictor.transformer_self_attention_layers.N.self_attn.in_proj_{weight,bias}
    transformer_module.decoder.layers.N.cross_attn  -> ...cross_attention_layers.N.multihead_attn
    transformer_module.decoder.layers.N.{fc1,fc2,final_layer_norm} -> transformer_ffn_layers.N...
    transformer_module.decoder.layernorm                -> predictor.decoder_norm
    transformer_module.decoder.mask_predictor.mask_embedder.I.0 -> predictor.mask_embed.layers.I
    class_predictor (top level)                         -> predictor.class_embed
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from model.config import (
    BackboneConfig,
    Category,
    InferenceConfig,
    Mask2FormerConfig,
    PixelDecoderConfig,
    TransformerDecoderConfig,
    coco_panoptic_categories,
)

_RESNET_DEPTHS = {  # (layer type, blocks per stage) -> torchvision depth
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
}
_RESNET_WIDTHS = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}

PD, TD = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."

# (HF pattern, our name) for everything outside the backbone; applied after dropping "model.".
_HEAD_RULES = [
    (r"pixel_level_module\.decoder\.input_projections\.", PD + "input_proj."),
    (r"pixel_level_module\.decoder\.level_embed$", PD + "transformer.level_embed"),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn\.",
     PD + r"transformer.encoder.layers.\1.self_attn."),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     PD + r"transformer.encoder.layers.\1.norm1."),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc1\.",
     PD + r"transformer.encoder.layers.\1.linear1."),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc2\.",
     PD + r"transformer.encoder.layers.\1.linear2."),
    (r"pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.final_layer_norm\.",
     PD + r"transformer.encoder.layers.\1.norm2."),
    (r"pixel_level_module\.decoder\.(adapter|layer)_(\d+)\.0\.weight$", PD + r"\1_\2.weight"),
    (r"pixel_level_module\.decoder\.(adapter|layer)_(\d+)\.1\.", PD + r"\1_\2.norm."),
    (r"pixel_level_module\.decoder\.mask_projection\.", PD + "mask_features."),
    (r"transformer_module\.queries_features\.", TD + "query_feat."),
    (r"transformer_module\.queries_embedder\.", TD + "query_embed."),
    (r"transformer_module\.level_embed\.", TD + "level_embed."),
    (r"transformer_module\.input_projections\.", TD + "input_proj."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     TD + r"transformer_self_attention_layers.\1.self_attn.out_proj."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     TD + r"transformer_self_attention_layers.\1.norm."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.",
     TD + r"transformer_cross_attention_layers.\1.multihead_attn."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.",
     TD + r"transformer_cross_attention_layers.\1.norm."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.fc1\.",
     TD + r"transformer_ffn_layers.\1.linear1."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.fc2\.",
     TD + r"transformer_ffn_layers.\1.linear2."),
    (r"transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.",
     TD + r"transformer_ffn_layers.\1.norm."),
    (r"transformer_module\.decoder\.layernorm\.", TD + "decoder_norm."),
    (r"transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.",
     TD + r"mask_embed.layers.\1."),
    (r"^class_predictor\.", TD + "class_embed."),
]

# Backbone rules, applied to keys below "pixel_level_module.encoder.".
_RESNET_RULES = [
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]
_SWIN_RULES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "features.0.0."),
    (r"^embeddings\.norm\.", "features.0.2."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.",
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.norm1."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.",
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.norm2."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.relative_position_bias_table$",
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.attn.relative_position_bias_table"),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.",
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.attn.qkv.{m[3]}."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.output\.dense\.",
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.intermediate\.dense\.",
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.mlp.0."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.output\.dense\.",
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.mlp.3."),
    (r"^encoder\.layers\.(\d+)\.downsample\.", lambda m: f"features.{2 * int(m[1]) + 2}."),
    (r"^hidden_states_norms\.stage(\d)\.", lambda m: f"norm{int(m[1]) - 1}."),
]
# transformers >= 5 names for the same Swin tensors (in memory), normalised to the saved ones.
_SWIN_ALIASES = [
    (r"^swin\.", ""),
    (r"\.attention\.([qkv])_proj\.",
     lambda m: {"q": ".attention.self.query.", "k": ".attention.self.key.",
                "v": ".attention.self.value."}[m[1]]),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.attention\.relative_position_bias\.relative_position_bias_table$",
     ".attention.self.relative_position_bias_table"),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]
# Buffers and heads we do not keep: derived indices, BN counters, the unused final Swin norm,
# the loss's class weights.
_SKIP = re.compile(r"(num_batches_tracked|relative_position_index|^swin\.layernorm\.|"
                   r"^layernorm\.|criterion\.)")


def convert_hf(src_folder: str | Path, *,
               categories: tuple[Category, ...] | None = None
               ) -> tuple[Mask2FormerConfig, dict[str, Tensor]]:
    """Config and state dict (our names) from a HF save_pretrained folder.

    `categories` overrides the label space (needed unless the checkpoint's labels are the 133
    COCO panoptic names or config.json carries `thing_ids`); its length must match the head.
    """
    folder = Path(src_folder)
    hf = json.loads((folder / "config.json").read_text())
    preprocessor = folder / "preprocessor_config.json"
    pre = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    cfg = config_from_hf(hf, categories=categories, preprocessor=pre)
    weights = folder / "model.safetensors"
    if weights.is_file():
        state_dict = load_file(str(weights))
    elif (folder / "pytorch_model.bin").is_file():  # older Hub checkpoints; tensors only
        state_dict = torch.load(folder / "pytorch_model.bin", map_location="cpu",
                                weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors (or pytorch_model.bin) in {folder}")
    return cfg, convert_hf_state_dict(state_dict, cfg)


def config_from_hf(hf: dict, *, categories: tuple[Category, ...] | None = None,
                   preprocessor: dict | None = None) -> Mask2FormerConfig:
    """Our config from a HF Mask2FormerConfig dict (and optional preprocessor config)."""
    if hf.get("model_type") != "mask2former":
        raise ValueError(f"not a Mask2Former config (model_type={hf.get('model_type')!r})")
    if list(hf.get("feature_strides", [4, 8, 16, 32])) != [4, 8, 16, 32]:
        raise ValueError(f"unsupported feature_strides {hf['feature_strides']}")
    pre = preprocessor or {}
    mean = _to_255(pre.get("image_mean", (0.485, 0.456, 0.406)))
    std = _to_255(pre.get("image_std", (0.229, 0.224, 0.225)))
    return Mask2FormerConfig(
        name=hf.get("_name_or_path") or "hf-import",
        categories=_categories(hf, categories),
        backbone=_backbone_config(hf),
        pixel_decoder=PixelDecoderConfig(
            conv_dim=hf["feature_size"], mask_dim=hf["mask_feature_size"], norm_groups=32,
            num_layers=hf["encoder_layers"], num_heads=hf["num_attention_heads"], num_points=4,
            dim_feedforward=hf["encoder_feedforward_dim"], dropout=hf.get("dropout", 0.0),
            common_stride=hf.get("common_stride", 4)),
        transformer_decoder=TransformerDecoderConfig(
            hidden_dim=hf["hidden_dim"], num_queries=hf["num_queries"],
            num_heads=hf["num_attention_heads"], dim_feedforward=hf["dim_feedforward"],
            num_layers=hf["decoder_layers"] - 1, pre_norm=hf.get("pre_norm", False),
            enforce_input_project=hf.get("enforce_input_projection", False),
            dropout=hf.get("dropout", 0.0)),
        inference=InferenceConfig(),
        pixel_mean=mean,
        pixel_std=std,
    )


def _to_255(values) -> tuple[float, float, float]:
    """HF processors give mean / std for 0..1 images; ours are for 0..255."""
    values = [float(v) for v in values]
    return tuple(v if max(values) > 1 else v * 255 for v in values)


def _categories(hf: dict, override: tuple[Category, ...] | None) -> tuple[Category, ...]:
    id2label = {int(k): v for k, v in hf.get("id2label", {}).items()}
    names = [id2label[i] for i in sorted(id2label)]
    if override is not None:
        if names and len(override) != len(names):
            raise ValueError(f"categories has {len(override)} entries but the checkpoint "
                             f"predicts {len(names)} classes")
        return tuple(override)
    coco = coco_panoptic_categories()
    if names == [c.name for c in coco]:
        return coco
    if "thing_ids" in hf:
        things = set(hf["thing_ids"])
        return tuple(Category(id=i, name=n, isthing=i in things, color=_color(i))
                     for i, n in enumerate(names))
    raise ValueError("the checkpoint's config.json does not say which classes are things; "
                     "pass categories=(Category(id, name, isthing, color), ...) in label order")


def _color(index: int) -> tuple[int, int, int]:
    g = torch.Generator().manual_seed(index)
    return tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))


def _backbone_config(hf: dict) -> BackboneConfig:
    bb = hf.get("backbone_config")
    if hf.get("use_timm_backbone") or bb is None:
        raise ValueError("only HF ResNet and Swin backbone configs can be imported "
                         f"(got backbone={hf.get('backbone')!r})")
    kind = bb.get("model_type")
    if kind == "resnet":
        if bb.get("downsample_in_bottleneck") or bb.get("downsample_in_first_stage"):
            raise ValueError("HF ResNet with downsample_in_bottleneck / downsample_in_first_stage "
                             "has no torchvision equivalent")
        layer_type = bb.get("layer_type", "bottleneck")
        key = (layer_type, tuple(bb["depths"]))
        if key not in _RESNET_DEPTHS or list(bb["hidden_sizes"]) != _RESNET_WIDTHS[layer_type] \
                or bb.get("embedding_size", 64) != 64:
            raise ValueError(f"HF ResNet {layer_type} depths={bb['depths']} "
                             f"hidden_sizes={bb['hidden_sizes']} is not a torchvision ResNet "
                             "18/34/50/101")
        return BackboneConfig(kind="resnet", depth=_RESNET_DEPTHS[key])
    if kind == "swin":
        if bb.get("use_absolute_embeddings") or bb.get("patch_size", 4) != 4:
            raise ValueError("only Swin with patch_size 4 and no absolute embeddings is supported")
        return BackboneConfig(kind="swin", embed_dim=bb["embed_dim"], depths=tuple(bb["depths"]),
                              num_heads=tuple(bb["num_heads"]), window_size=bb["window_size"],
                              mlp_ratio=bb.get("mlp_ratio", 4.0))
    raise ValueError(f"unsupported HF backbone {kind!r}; use resnet or swin")


def _apply(rules: list, key: str) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def convert_hf_state_dict(hf_sd: dict[str, Tensor], cfg: Mask2FormerConfig) -> dict[str, Tensor]:
    """Rename (and fuse q/k/v of) a HF state dict; raises on keys it does not understand."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}  # our prefix -> {"query.weight": ...}
    unknown = []
    backbone_rules = _RESNET_RULES if cfg.backbone.kind == "resnet" else _SWIN_RULES
    for key, value in hf_sd.items():
        key = key.removeprefix("model.")
        if key.startswith("pixel_level_module.encoder."):
            sub = key.removeprefix("pixel_level_module.encoder.")
            for pattern, repl in _SWIN_ALIASES if cfg.backbone.kind == "swin" else []:
                sub = re.sub(pattern, repl, sub)
            if _SKIP.search(sub):
                continue
            new = _apply(backbone_rules, sub)
            if new is not None and ".attn.qkv." in new:
                prefix, part = new.split(".attn.qkv.")
                qkv.setdefault("backbone." + prefix + ".attn.qkv.", {})[part] = value
                continue
            new = None if new is None else "backbone." + new
        elif _SKIP.search(key):
            continue
        else:
            m = re.match(r"transformer_module\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\."
                         r"(weight|bias)$", key)
            if m:
                prefix = TD + f"transformer_self_attention_layers.{m[1]}.self_attn.in_proj_"
                part = {"q": "query", "k": "key", "v": "value"}[m[2]] + "." + m[3]
                qkv.setdefault(prefix, {})[part] = value
                continue
            new = _apply(_HEAD_RULES, key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"unrecognised HF keys (first ones): {unknown[:5]}")
    for prefix, parts in qkv.items():
        for kind in ("weight", "bias"):
            out[prefix + kind] = torch.cat([parts[f"{n}.{kind}"] for n in ("query", "key",
                                                                           "value")])
    return out
