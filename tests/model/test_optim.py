"""The optimiser recipe: parameter groups, the warmup + poly schedule, full-model clipping."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from model.mask2former import build_model
from model.optim import (
    WARMUP_START_FACTOR,
    WarmupPoly,
    build_optimizer,
    clip_grad_norm,
    param_groups,
    warmup_poly_scheduler,
)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


def _settings(groups: list[dict]) -> dict[str, tuple[float, float]]:
    return {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["names"]}


def test_groups_cover_every_trainable_parameter_once(tiny):
    groups = param_groups(tiny, lr=1e-4, weight_decay=0.05, backbone_lr_multiplier=0.1)
    names = [n for g in groups for n in g["names"]]
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_backbone_lr_and_no_decay_on_norms_and_embeddings(tiny):
    s = _settings(param_groups(tiny, lr=2e-4, weight_decay=0.05, backbone_lr_multiplier=0.1))
    assert s["backbone.conv1.weight"] == pytest.approx((2e-5, 0.05))
    assert s["sem_seg_head.predictor.class_embed.weight"] == pytest.approx((2e-4, 0.05))
    assert s["sem_seg_head.predictor.class_embed.bias"] == pytest.approx((2e-4, 0.05))
    for emb in ("query_feat", "query_embed", "level_embed"):
        assert s[f"sem_seg_head.predictor.{emb}.weight"] == (2e-4, 0.0)
    assert s["sem_seg_head.predictor.decoder_norm.weight"] == (2e-4, 0.0)
    assert s["sem_seg_head.pixel_decoder.input_proj.0.1.weight"] == (2e-4, 0.0)  # GroupNorm
    norms = [n for n, (_, wd) in s.items() if "norm" in n.split(".")[-2]]
    assert norms and all(s[n][1] == 0.0 for n in norms)


def test_swin_relative_position_tables_get_no_decay():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
            self.qkv = nn.Linear(2, 6)

    net = nn.Module()
    net.backbone = Attn()
    s = _settings(param_groups(net, lr=1.0, weight_decay=0.5, backbone_lr_multiplier=0.1))
    assert s["backbone.relative_position_bias_table"] == pytest.approx((0.1, 0.0))
    assert s["backbone.qkv.weight"] == pytest.approx((0.1, 0.5))


def test_frozen_parameters_are_left_out():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0].weight.requires_grad_(False)
    names = [n for g in param_groups(net) for n in g["names"]]
    assert "0.weight" not in names and "0.bias" in names


def test_schedule_warms_up_linearly_then_decays_poly():
    sched = WarmupPoly(total_steps=100, warmup_steps=10, power=0.9)
    assert sched(0) == pytest.approx(WARMUP_START_FACTOR)
    assert sched(5) == pytest.approx((WARMUP_START_FACTOR * 0.5 + 0.5) * (1 - 0.05) ** 0.9)
    assert sched(10) == pytest.approx(0.9**0.9)
    assert sched(50) == pytest.approx(0.5**0.9)
    assert sched(100) == 0.0
    values = [sched(s) for s in range(10, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_scheduler_scales_each_group_and_resumes_from_state_dict(tiny):
    opt = build_optimizer(tiny, lr=1e-3, weight_decay=0.05, backbone_lr_multiplier=0.1)
    sched = warmup_poly_scheduler(opt, total_steps=20, warmup_steps=0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.defaults["fused"]
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    factor = (1 - 5 / 20) ** 0.9
    assert lrs == pytest.approx(sorted({1e-4 * factor, 1e-3 * factor}))
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt2 = build_optimizer(tiny, lr=1e-3)
    sched2 = warmup_poly_scheduler(opt2, total_steps=20, warmup_steps=0)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert sched2.last_epoch == 6
    expected = 1e-3 * (1 - 6 / 20) ** 0.9
    assert max(g["lr"] for g in opt2.param_groups) == pytest.approx(expected)


def test_clip_grad_norm_bounds_the_whole_model_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    net(torch.randn(8, 4)).pow(2).sum().backward()
    before = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters()]))
    reported = clip_grad_norm(net.parameters(), max_norm=0.01)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert reported == pytest.approx(before.item(), rel=1e-5)
    assert before > 0.01
    assert after == pytest.approx(0.01, rel=1e-3)


def test_invalid_settings_say_what_to_fix(tiny):
    with pytest.raises(ValueError, match="lr must be positive"):
        build_optimizer(tiny, lr=0.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_poly_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1), total_steps=0)
