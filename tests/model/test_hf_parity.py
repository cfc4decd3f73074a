"""Parity with Hugging Face's Mask2Former: same weights (through convert_hf), same outputs.

HF models get random weights, every parameter and buffer perturbed so that nothing sits at a
trivial value (zero offsets, unit norms, zero BN statistics); BN running statistics come from
real batch statistics so activations stay in a realistic range.
"""

from __future__ import annotations

import pytest
import torch

from model.config import Category, coco_panoptic_categories
from model.convert_hf import convert_hf
from model.mask2former import build_model

transformers = pytest.importorskip("transformers")

STAGES = ["stage1", "stage2", "stage3", "stage4"]
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


def _randomised_hf(backbone_config, *, seed: int, images: torch.Tensor, **head_kwargs):
    torch.manual_seed(seed)
    cfg = transformers.Mask2FormerConfig(backbone_config=backbone_config, **head_kwargs)
    hf = transformers.Mask2FormerForUniversalSegmentation(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or "normalization.weight" in name \
                    or "layer_norm.weight" in name or "layernorm" in name and "weight" in name:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        backbone = hf.model.pixel_level_module.encoder
        bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if bns:
            # Running statistics = the statistics of a real batch (cumulative average, 1 step).
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
            backbone.train()
            backbone((images - MEAN) / STD)
            backbone.eval()
            for bn in bns:  # tiny maps give near-zero variances that would amplify rounding
                bn.running_var.clamp_(min=0.25)
    return hf


def _compare(hf, tmp_path, images, categories=None, *, backbone_only_check=True):
    hf.save_pretrained(tmp_path)
    cfg, state_dict = convert_hf(tmp_path, categories=categories)
    ours = build_model(cfg)
    ours.load_state_dict(state_dict, strict=True)
    with torch.inference_mode():
        # Same values in the channels_last layout our backbone uses, so that both sides'
        # convolutions round alike (random deep nets amplify last-bit differences).
        hf_in = ((images - MEAN) / STD).contiguous(memory_format=torch.channels_last)
        if backbone_only_check:
            theirs = hf.model.pixel_level_module.encoder(hf_in).feature_maps
            mine = ours.backbone(hf_in)
            for name, t in zip(("res2", "res3", "res4", "res5"), theirs):
                torch.testing.assert_close(mine[name], t, atol=1e-4, rtol=1e-4)
        ref = hf(pixel_values=hf_in, output_auxiliary_logits=True)
        out = ours(images)
        fast = ours(images, aux_outputs=False)  # inference: last prediction only
    assert fast["aux_outputs"] == []
    assert (fast["pred_logits"] - ref.class_queries_logits).abs().max() < 1e-4
    assert (fast["pred_masks"] - ref.masks_queries_logits).abs().max() < 1e-4
    ref_preds = [(a["class_queries_logits"], a["masks_queries_logits"])
                 for a in ref.auxiliary_logits]
    ref_preds.append((ref.class_queries_logits, ref.masks_queries_logits))
    our_preds = [(a["pred_logits"], a["pred_masks"]) for a in out["aux_outputs"]]
    our_preds.append((out["pred_logits"], out["pred_masks"]))
    assert len(our_preds) == len(ref_preds) == cfg.transformer_decoder.num_layers + 1
    for i, ((c, m), (rc, rm)) in enumerate(zip(our_preds, ref_preds)):
        assert c.shape == rc.shape and m.shape == rm.shape, f"prediction {i}"
        assert (c - rc).abs().max() < 1e-4, f"class logits of prediction {i}"
        assert (m - rm).abs().max() < 1e-4, f"mask logits of prediction {i}"
    # The comparison means something only if the outputs vary across queries and pixels.
    assert out["pred_masks"].std() > 0.1 and out["pred_logits"].std() > 0.1
    return cfg


def test_resnet50_reference_head_matches_hf(tmp_path):
    images = torch.rand(1, 3, 96, 128) * 255
    coco = coco_panoptic_categories()
    backbone = transformers.ResNetConfig(
        depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
        out_features=STAGES)
    hf = _randomised_hf(backbone, seed=0, images=images, num_labels=len(coco),
                        id2label={i: c.name for i, c in enumerate(coco)})
    cfg = _compare(hf, tmp_path, images)
    assert cfg.backbone.depth == 50 and cfg.categories == coco
    assert cfg.transformer_decoder.num_layers == 9 and cfg.transformer_decoder.num_queries == 100


def test_small_pre_norm_config_matches_hf(tmp_path):
    """Other widths, heads, queries and layer counts, pre-norm and enforced input projection."""
    images = torch.rand(2, 3, 64, 96) * 255
    backbone = transformers.ResNetConfig(
        depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
        out_features=STAGES)
    hf = _randomised_hf(
        backbone, seed=1, images=images, num_labels=5, num_queries=12, decoder_layers=5,
        encoder_layers=2, hidden_dim=64, feature_size=64, mask_feature_size=48,
        num_attention_heads=4, dim_feedforward=96, encoder_feedforward_dim=80, pre_norm=True,
        enforce_input_projection=True)
    cats = tuple(Category(id=10 + i, name=f"c{i}", isthing=i < 2, color=(i, i, i))
                 for i in range(5))
    cfg = _compare(hf, tmp_path, images, categories=cats)
    assert cfg.backbone.depth == 18 and cfg.transformer_decoder.num_layers == 4
    assert cfg.transformer_decoder.pre_norm and cfg.categories == cats


def test_tiny_swin_matches_hf(tmp_path):
    images = torch.rand(1, 3, 224, 224) * 255  # stage maps 56..7: no window smaller than 7
    backbone = transformers.SwinConfig(
        embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7,
        out_features=STAGES, drop_path_rate=0.0)
    hf = _randomised_hf(backbone, seed=2, images=images, num_labels=3, num_queries=10,
                        decoder_layers=4, encoder_layers=1, hidden_dim=64, feature_size=64,
                        mask_feature_size=64, num_attention_heads=4, dim_feedforward=128,
                        encoder_feedforward_dim=64, thing_ids=[0])
    cfg = _compare(hf, tmp_path, images)
    assert cfg.backbone.kind == "swin" and [c.isthing for c in cfg.categories] == [True, False,
                                                                                  False]


def test_unlabelled_checkpoint_asks_for_categories(tmp_path):
    images = torch.rand(1, 3, 64, 64) * 255
    backbone = transformers.ResNetConfig(
        depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
        out_features=STAGES)
    hf = _randomised_hf(backbone, seed=3, images=images, num_labels=4, num_queries=4,
                        decoder_layers=2, encoder_layers=1, hidden_dim=64, feature_size=64,
                        mask_feature_size=64, num_attention_heads=4, dim_feedforward=64,
                        encoder_feedforward_dim=64)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="categories"):
        convert_hf(tmp_path)


def test_config_reads_preprocessor_statistics_and_rejects_unknown_backbones():
    from model.convert_hf import config_from_hf

    hf = transformers.Mask2FormerConfig(
        backbone_config=transformers.ResNetConfig(out_features=STAGES), num_labels=2,
        thing_ids=[1]).to_dict()
    cfg = config_from_hf(hf, preprocessor={"image_mean": [0.5, 0.25, 0.0],
                                           "image_std": [0.5, 0.5, 1.0]})
    assert cfg.pixel_mean == (127.5, 63.75, 0.0) and cfg.pixel_std == (127.5, 127.5, 255.0)
    assert [c.isthing for c in cfg.categories] == [False, True]
    hf["backbone_config"]["downsample_in_bottleneck"] = True
    with pytest.raises(ValueError, match="downsample_in_bottleneck"):
        config_from_hf(hf)
