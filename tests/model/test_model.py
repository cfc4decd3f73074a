"""The assembled Mask2Former: shapes on real images, padding, autocast, variants, training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import model.pixel_decoder as pixel_decoder
from model.config import get_config
from model.mask2former import build_model
from model.pixel_decoder import MSDeformAttn, op_dtype


def _load_images(coco_sample) -> list[torch.Tensor]:
    paths = sorted((coco_sample / "images").glob("*.jpg"))
    assert len(paths) == 2
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float()
            for p in paths]


def _check_outputs(out: dict, *, batch: int, queries: int, classes: int, h: int, w: int,
                   layers: int) -> None:
    assert out["pred_logits"].shape == (batch, queries, classes + 1)
    assert out["pred_masks"].shape == (batch, queries, h, w)
    assert len(out["aux_outputs"]) == layers
    for pred in [out, *out["aux_outputs"]]:
        assert pred["pred_logits"].shape == out["pred_logits"].shape
        assert pred["pred_masks"].shape == out["pred_masks"].shape
        assert torch.isfinite(pred["pred_logits"]).all()
        assert torch.isfinite(pred["pred_masks"]).all()


@pytest.mark.parametrize("preset", ["tiny", "r50-coco-panoptic"])
def test_real_coco_images_at_native_size(coco_sample, preset):
    torch.manual_seed(0)
    net = build_model(preset)
    cfg = net.config
    images = _load_images(coco_sample)
    for image in images if preset == "tiny" else images[:1]:  # r50: one image keeps it quick
        h, w = image.shape[1:]
        with torch.inference_mode():
            out = net(image[None])
        pad_h, pad_w = -(-h // 32) * 32, -(-w // 32) * 32
        _check_outputs(out, batch=1, queries=cfg.transformer_decoder.num_queries,
                       classes=cfg.num_classes, h=pad_h // 4, w=pad_w // 4,
                       layers=cfg.transformer_decoder.num_layers)
        if preset == "tiny":
            # Every layer refines the queries: no two predictions are identical.
            masks = [p["pred_masks"] for p in out["aux_outputs"]] + [out["pred_masks"]]
            assert all(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))


def test_inference_path_gives_the_full_paths_last_prediction(coco_sample):
    """aux_outputs=False makes the earlier attention masks from resized mask features instead
    of resizing full-resolution masks: the same linear arithmetic in another order."""
    torch.manual_seed(0)
    net = build_model("tiny")
    for image in _load_images(coco_sample):
        with torch.inference_mode():
            full, fast = net(image[None]), net(image[None], aux_outputs=False)
        assert fast["aux_outputs"] == [] and len(full["aux_outputs"]) > 0
        torch.testing.assert_close(fast["pred_logits"], full["pred_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(fast["pred_masks"], full["pred_masks"], atol=1e-5, rtol=0)


def test_padding_happens_after_normalisation():
    """Padding inside the model equals padding the input with the pixel mean (zero once
    normalised): the reference's ImageList pads normalised images with 0."""
    torch.manual_seed(0)
    net = build_model("tiny")
    image = torch.rand(1, 3, 50, 70) * 255
    mean = torch.tensor(net.config.pixel_mean).view(1, 3, 1, 1)
    padded = mean.expand(1, 3, 64, 96).clone()
    padded[..., :50, :70] = image
    with torch.inference_mode():
        a, b = net(image), net(padded)
    assert a["pred_masks"].shape == (1, 16, 16, 24)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        c = net(torch.cat([image, image]))  # batching changes nothing either
    torch.testing.assert_close(c["pred_masks"][1:], a["pred_masks"], atol=1e-4, rtol=1e-4)


def test_cpu_autocast_runs_in_bfloat16_but_feeds_the_op_float32(monkeypatch):
    torch.manual_seed(0)
    net = build_model("tiny")
    images = torch.rand(1, 3, 96, 128) * 255
    seen = []
    real_op = pixel_decoder.ms_deform_attn

    def spy(value, shapes, starts, locations, weights, *args, **kwargs):
        seen.append((value.dtype, locations.dtype, weights.dtype))
        return real_op(value, shapes, starts, locations, weights, *args, **kwargs)

    proj_dtypes = []
    hook = net.sem_seg_head.pixel_decoder.transformer.encoder.layers[0].self_attn.value_proj \
        .register_forward_hook(lambda m, i, o: proj_dtypes.append(o.dtype))
    monkeypatch.setattr(pixel_decoder, "ms_deform_attn", spy)
    with torch.inference_mode():
        ref = net(images)
        seen.clear()
        proj_dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(images)
    hook.remove()
    assert proj_dtypes == [torch.bfloat16]  # the pixel decoder's linears run in bfloat16
    assert seen and all(d == (torch.float32,) * 3 for d in seen)
    assert low["pred_masks"].dtype == torch.bfloat16
    # Loose: bfloat16 keeps ~3 significant digits through ~25 layers.
    error = (low["pred_masks"].float() - ref["pred_masks"]).norm() / ref["pred_masks"].norm()
    assert error < 0.05
    agree = (low["pred_masks"].float() > 0) == (ref["pred_masks"] > 0)
    assert agree.float().mean() > 0.9


def test_op_dtype_policy():
    assert op_dtype("cuda", torch.float16) == torch.float16
    assert op_dtype("cuda", torch.bfloat16) == torch.float32
    assert op_dtype("cuda", torch.float32) == torch.float32
    assert op_dtype("cpu", torch.bfloat16) == torch.float32
    assert op_dtype("cpu", torch.float64) == torch.float64


def _bilinear_zero_pad(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img (h, w, c); (x, y) in [0, 1] -> (c,), pixel centres at (i + 0.5) / size."""
    h, w, _ = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    out = torch.zeros(img.shape[-1], dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[yy, xx]
    return out


def test_deformable_attention_module_with_two_levels_and_three_points():
    """MSDeformAttn against a plain loop over heads, levels and points."""
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=8, num_heads=2, num_levels=2, num_points=3).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    shapes = [(4, 5), (2, 3)]
    S = sum(h * w for h, w in shapes)
    value_in = torch.randn(1, S, 8, dtype=torch.float64)
    query = torch.randn(1, 3, 8, dtype=torch.float64)
    ref_points = torch.rand(1, 3, 2, dtype=torch.float64)
    spatial = torch.tensor(shapes)
    starts = torch.tensor([0, 20])
    with torch.no_grad():
        out = attn(query, ref_points, value_in, spatial, starts)
        value = attn.value_proj(value_in)[0].view(S, 2, 4)  # (S, nH, c)
        offsets = attn.sampling_offsets(query)[0].view(3, 2, 2, 3, 2)  # (Q, nH, L, P, xy)
        logits = attn.attention_weights(query)[0].view(3, 2, 6)
        weights = logits.softmax(-1).view(3, 2, 2, 3)
        expected = torch.zeros(3, 8, dtype=torch.float64)
        for q in range(3):
            for head in range(2):
                acc = torch.zeros(4, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    start = int(starts[lvl])
                    img = value[start:start + h * w, head].view(h, w, 4)
                    for p in range(3):
                        x = ref_points[0, q, 0] + offsets[q, head, lvl, p, 0] / w
                        y = ref_points[0, q, 1] + offsets[q, head, lvl, p, 1] / h
                        acc += weights[q, head, lvl, p] * _bilinear_zero_pad(img, float(x),
                                                                             float(y))
                expected[q, head * 4:(head + 1) * 4] = acc
        expected = attn.output_proj(expected)
    torch.testing.assert_close(out[0], expected, atol=1e-9, rtol=1e-9)


def test_two_encoder_levels_and_two_points_build_and_run():
    cfg = get_config("tiny")
    cfg = dataclasses.replace(cfg, pixel_decoder=dataclasses.replace(
        cfg.pixel_decoder, in_features=("res4", "res5"), num_points=2))
    net = build_model(cfg)
    pd = net.sem_seg_head.pixel_decoder
    assert len(pd.input_proj) == 2 and hasattr(pd, "adapter_2") and not hasattr(pd, "adapter_3")
    assert pd.transformer.encoder.layers[0].self_attn.sampling_offsets.out_features == 4 * 2 * 2 * 2
    with torch.inference_mode():
        out = net(torch.rand(1, 3, 64, 64) * 255)
    _check_outputs(out, batch=1, queries=16, classes=cfg.num_classes, h=16, w=16, layers=3)


def test_swin_backbone_handles_maps_smaller_than_a_window():
    cfg = get_config("swin-t-coco-panoptic")
    small = dataclasses.replace(cfg, backbone=dataclasses.replace(
        cfg.backbone, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)))
    net = build_model(small)
    with torch.inference_mode():
        features = net.backbone(torch.randn(1, 3, 96, 160))  # res5 is 3 x 5 < window 7
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "res2": (1, 32, 24, 40), "res3": (1, 64, 12, 20), "res4": (1, 128, 6, 10),
        "res5": (1, 256, 3, 5)}
    assert all(torch.isfinite(v).all() for v in features.values())


def test_training_step_reaches_head_and_backbone():
    torch.manual_seed(0)
    net = build_model("tiny").train()
    out = net(torch.rand(2, 3, 64, 64) * 255)
    loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_masks"].sigmoid().mean()
    loss = loss + sum(a["pred_masks"].sigmoid().mean() for a in out["aux_outputs"])
    loss.backward()
    named = dict(net.named_parameters())
    for name in ("backbone.conv1.weight",
                 "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn"
                 ".sampling_offsets.weight",
                 "sem_seg_head.predictor.query_feat.weight",
                 "sem_seg_head.predictor.class_embed.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert "backbone.bn1.weight" not in named  # frozen BN: statistics and affine are buffers
