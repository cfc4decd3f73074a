"""model.cpu_training: the opt-in CPU training layer keeps the plain model's keys and results, and
each fast path (Winograd 3x3, 1x1 GEMM, channels_last GroupNorm, compiled point selection, the
channels_last AdamW) equals the PyTorch computation it replaces."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_ops, cpu_training
from model.backbone import build_backbone
from model.config import BackboneConfig
from model.cpu_training import (
    ChannelsLastAdamW,
    ChannelsLastGroupNorm,
    MatmulConv1x1,
    WinogradConv3x3,
    accelerate_cpu_training,
    select_uncertain_points,
)
from model.mask2former import build_model
from model.ops import has_compiled_op
from model.pixel_decoder import ConvNorm
from model.point_sampling import point_sample, uncertain_point_coords_with_randomness

needs_op = pytest.mark.skipif(not has_compiled_op(), reason="model._C is not built")

CL = torch.channels_last
FAST_TYPES = (MatmulConv1x1, WinogradConv3x3, ChannelsLastGroupNorm)


def _accelerated(module: nn.Module) -> nn.Module:
    return accelerate_cpu_training(nn.Sequential(module))[0]


# ------------------------------------------------------------------- the model, plain and fast

def test_plain_model_has_only_torch_convolutions_and_norms():
    net = build_model("tiny")
    for name, m in net.named_modules():
        assert not isinstance(m, FAST_TYPES), name
        if isinstance(m, nn.Conv2d):
            assert type(m) in (nn.Conv2d, ConvNorm), name
        if isinstance(m, nn.GroupNorm):
            assert type(m) is nn.GroupNorm, name


@needs_op
def test_acceleration_keeps_keys_and_outputs_of_the_plain_model():
    torch.manual_seed(0)
    plain = build_model("tiny").train()
    fast = accelerate_cpu_training(copy.deepcopy(plain))
    types = {type(m) for m in fast.modules()}
    assert {MatmulConv1x1, WinogradConv3x3, ChannelsLastGroupNorm,
            cpu_training.MatmulConvNorm1x1, cpu_training.WinogradConvNorm3x3} <= types
    want, got = plain.state_dict(), fast.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert accelerate_cpu_training(fast) is fast  # twice: nothing more changes
    assert fast.state_dict().keys() == want.keys()

    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 255
    outs = [net(images) for net in (plain, fast)]  # training: the Winograd path runs
    tol = {"rtol": 1e-4, "atol": 1e-4}
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(outs[1][key], outs[0][key], **tol)
    losses = [o["pred_masks"].sigmoid().mean() + o["pred_logits"].logsumexp(-1).mean()
              for o in outs]
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        scale = p.grad.abs().max().item() + 1e-12
        assert (q.grad - p.grad).abs().max().item() <= 1e-3 * scale, name
    with torch.no_grad():  # inference
        a, b = plain.eval()(images), fast.eval()(images)
    torch.testing.assert_close(b["pred_masks"], a["pred_masks"], **tol)


# ------------------------------------------------------------------------- Winograd F(2x2, 3x3)

def _inputs(B, C, c_out, H, W, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype).contiguous(memory_format=CL)
    w = torch.randn(c_out, C, 3, 3, generator=g, dtype=dtype) / (3 * C ** 0.5)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return x, w, b


# odd and even sizes (a last tile half off the map), one pixel, one channel, B > 1
@needs_op
@pytest.mark.parametrize("shape", [(2, 3, 5, 5, 7), (1, 4, 2, 6, 6), (2, 8, 8, 1, 1),
                                   (1, 1, 3, 2, 3), (3, 16, 24, 9, 4)])
def test_winograd_equals_conv2d_forward_and_backward_float64(shape):
    x, w, b = _inputs(*shape, torch.float64)
    params = [t.requires_grad_() for t in (x, w, b)]
    got = cpu_training.winograd_conv3x3(x, w, b)
    want = F.conv2d(x, w, b, stride=1, padding=1)
    assert got.shape == want.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, params, grad),
                    torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@needs_op
def test_winograd_float32_error_is_rounding_sized():
    x, w, _ = _inputs(2, 64, 64, 32, 32, torch.float32, bias=False)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    for y in (cpu_training.winograd_conv3x3(x, w), F.conv2d(x, w, padding=1)):
        assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5


@needs_op
def test_winograd_accepts_contiguous_input():
    x, w, b = _inputs(2, 5, 4, 7, 6, torch.float64)
    torch.testing.assert_close(cpu_training.winograd_conv3x3(x.contiguous(), w, b),
                               F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)


@needs_op
def test_winograd_gradcheck():
    x, w, b = _inputs(1, 2, 3, 5, 4, torch.float64)
    assert torch.autograd.gradcheck(cpu_training.winograd_conv3x3,
                                    (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@needs_op
@pytest.mark.parametrize("op,args", [
    ("winograd_f23_input", lambda: (torch.randn(2, 3, 5, 4).contiguous(memory_format=CL),)),
    ("winograd_f23_output", lambda: (torch.randn(16, 2 * 3 * 2, 4), [2, 4, 5, 4])),
])
def test_winograd_ops_pass_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.panoray, op).default, args())


@needs_op
def test_winograd_ops_refuse_bad_shapes():
    with pytest.raises(RuntimeError, match=r"must be \(B, C, H, W\)"):
        torch.ops.panoray.winograd_f23_input(torch.randn(3, 5, 4))
    with pytest.raises(RuntimeError, match=r"expected the transformed tiles as \(16, 12, 4\)"):
        torch.ops.panoray.winograd_f23_output(torch.randn(16, 11, 4), [2, 4, 5, 4])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.panoray.winograd_f23_input(torch.zeros(1, 2, 3, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must not be empty"):
        torch.ops.panoray.winograd_f23_input(torch.zeros(1, 2, 0, 3))


@needs_op
def test_conv2d_takes_the_winograd_path_only_where_it_applies(monkeypatch):
    calls = []
    real = cpu_training.winograd_conv3x3
    monkeypatch.setattr(cpu_training, "winograd_conv3x3", lambda *a: calls.append(1) or real(*a))

    def winograd(m, x):
        calls.clear()
        torch.testing.assert_close(
            m(x), F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation),
            rtol=1e-5, atol=1e-5)
        return bool(calls)

    torch.manual_seed(0)
    m = _accelerated(nn.Conv2d(8, 6, 3, padding=1).to(memory_format=CL))
    big = torch.randn(2, 8, 16, 16).contiguous(memory_format=CL)  # 2 * 8 * 8 = 128 tiles
    assert winograd(m, big)
    assert not winograd(m, big[:, :, :14, :14])  # 98 tiles
    for other in (nn.Conv2d(8, 6, 3, padding=1, stride=2),
                  nn.Conv2d(8, 6, 3, padding=2, dilation=2), nn.Conv2d(8, 6, 3)):
        assert not winograd(_accelerated(other), big)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        calls.clear()
        m(big)
        assert calls == []
    with torch.no_grad():  # inference keeps the direct convolution
        assert not winograd(m, big)
    frozen = _accelerated(nn.Conv2d(8, 6, 3, padding=1).requires_grad_(False))
    assert not winograd(frozen, big)  # nothing to differentiate
    assert winograd(m.double(), big.double())


@needs_op
def test_resnet_backbone_runs_winograd_with_torchvision_names():
    backbone = accelerate_cpu_training(build_backbone(BackboneConfig(kind="resnet", depth=18)))
    convs = {n: type(m) for n, m in backbone.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for name in ("layer1.0.conv1", "layer2.0.conv2", "layer4.1.conv1"):
        assert convs[name] is WinogradConv3x3
    # the 7x7 stem, the stride-2 and the 1x1 layers keep nn.Conv2d
    for name in ("conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        assert convs[name] is torch.nn.Conv2d
    assert "layer1.0.conv1.weight" in backbone.state_dict()


# --------------------------------------------------------------------- 1x1 convolution as a GEMM

def test_one_by_one_convolution_as_a_matrix_product_equals_conv2d():
    torch.manual_seed(0)
    conv = _accelerated(nn.Conv2d(24, 16, kernel_size=1).to(memory_format=torch.channels_last))
    assert type(conv) is MatmulConv1x1
    x = torch.randn(2, 24, 5, 7).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    expected = torch.autograd.grad(want, (x, conv.weight, conv.bias), grad)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # contiguous (NCHW) inputs and 3x3 kernels take nn.Conv2d's own path
    assert torch.equal(conv(x.detach().contiguous()),
                       torch.nn.functional.conv2d(x.detach().contiguous(), conv.weight, conv.bias))


# ----------------------------------------------------------------------- channels_last GroupNorm

@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_group_norm_equals_torch(dtype):
    torch.manual_seed(0)
    norm = _accelerated(nn.GroupNorm(4, 12)).to(dtype)
    assert type(norm) is ChannelsLastGroupNorm
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # an offset mean: E[x^2] - mean^2 must not cancel
    x = (torch.randn(3, 12, 5, 7, dtype=dtype) * 2 + 30).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    out = norm(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    plain = x.detach().contiguous().requires_grad_(True)
    want = torch.nn.functional.group_norm(plain, 4, norm.weight, norm.bias, norm.eps)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, want, **tol)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (x, norm.weight, norm.bias), grad)
    expected = torch.autograd.grad(want, (plain, norm.weight, norm.bias), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():  # inference takes the same kernel
        torch.testing.assert_close(norm(x), want, **tol)
    if dtype == torch.float64:
        small = torch.randn(2, 12, 3, 2, dtype=dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_(True)
        def group_norm(t, weight, bias):
            return cpu_ops.group_norm_nhwc(t, weight, bias, 4, 1e-5)
        assert torch.autograd.gradcheck(group_norm, (small, norm.weight, norm.bias))
        torch.library.opcheck(torch.ops.panoray.group_norm_nhwc.default,
                              (small, norm.weight, norm.bias, 4, 1e-5))


# ------------------------------------------------------------------- compiled point selection

def topk_selection(logits: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The Python path: grid_sample, -|logit|, top-k, gather."""
    uncertainty = -point_sample(logits.unsqueeze(1), candidates).abs()[:, 0]
    top = torch.topk(uncertainty, k=k, dim=1).indices
    return torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))


@needs_op
@pytest.mark.parametrize("shape", [(5, 32, 32), (2, 7, 13), (1, 1, 1)])
def test_compiled_selection_keeps_the_top_k_set(shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(*shape, generator=g) * 3
    candidates = torch.rand(shape[0], 3000, 2, generator=g)
    k = 750
    got = torch.ops.panoray.most_uncertain_points(logits, candidates, k)
    want = topk_selection(logits, candidates, k)
    assert got.shape == (shape[0], k, 2)
    for r in range(shape[0]):
        assert sorted(map(tuple, got[r].tolist())) == sorted(map(tuple, want[r].tolist()))
        # kept in candidate order
        index = {tuple(c): i for i, c in enumerate(candidates[r].tolist())}
        order = [index[tuple(c)] for c in got[r].tolist()]
        assert order == sorted(order)

    # Candidates outside the map read the zero padding: many score exactly 0 and tie, so only
    # the kept scores are comparable, not which of the tied points were kept.
    outside = candidates * 1.6 - 0.3
    got = torch.ops.panoray.most_uncertain_points(logits, outside, k)
    want = topk_selection(logits, outside, k)
    def kept_scores(points):
        return point_sample(logits.unsqueeze(1), points).abs().sort(dim=-1).values
    torch.testing.assert_close(kept_scores(got), kept_scores(want), rtol=0, atol=1e-6)

    # Points a float's width either side of where the map's last and first bilinear corners
    # end (pixel coordinates -1 and w or h), where rounding decides the cell.
    h, w = shape[1:]
    edges = torch.tensor([-0.5 / w, (w + 0.5) / w, -0.5 / h, (h + 0.5) / h])
    edges = torch.cat([torch.nextafter(edges, edges - 1), edges, torch.nextafter(edges, edges + 1)])
    grid = torch.cartesian_prod(edges, edges)  # (144, 2)
    points = torch.cat([grid, candidates[0, :856]])[None].expand(shape[0], -1, -1).contiguous()
    got = torch.ops.panoray.most_uncertain_points(logits, points, 500)
    torch.testing.assert_close(kept_scores(got), kept_scores(topk_selection(logits, points, 500)),
                               rtol=0, atol=1e-6)


@needs_op
def test_compiled_selection_ties_nan_and_edge_sizes():
    candidates = torch.rand(2, 10, 2, generator=torch.Generator().manual_seed(0))
    flat = torch.zeros(2, 4, 4)  # every candidate reads exactly 0: the first k win the tie
    assert torch.equal(torch.ops.panoray.most_uncertain_points(flat, candidates, 3),
                       candidates[:, :3])
    # NaN counts as the most uncertain, as torch.topk ranks it: only the points that read the
    # NaN pixel (0, 0) are kept, even against logits of 0.
    with_nan = torch.full((1, 4, 4), 10.0)
    with_nan[0, 3, 3] = 0.0
    with_nan[0, 0, 0] = float("nan")
    points = torch.tensor([[[0.1, 0.1], [0.875, 0.875], [0.125, 0.125], [0.6, 0.6]]])
    assert torch.equal(torch.ops.panoray.most_uncertain_points(with_nan, points, 2),
                       points[:, [0, 2]])
    assert torch.ops.panoray.most_uncertain_points(flat, candidates, 0).shape == (2, 0, 2)
    torch.library.opcheck(torch.ops.panoray.most_uncertain_points.default, (flat, candidates, 3))
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.panoray.most_uncertain_points(flat, candidates, 11)
    with pytest.raises(RuntimeError, match="must be float32"):
        torch.ops.panoray.most_uncertain_points(flat.double(), candidates, 1)
    with pytest.raises(RuntimeError, match="maps are empty"):
        torch.ops.panoray.most_uncertain_points(flat[:, :0], candidates, 1)
    with pytest.raises(RuntimeError, match="candidates must be"):
        torch.ops.panoray.most_uncertain_points(flat, candidates[..., :1], 1)


@needs_op
def test_compiled_selector_picks_the_plain_selectors_points():
    num_points, oversample_ratio, seed = 50, 3.0, 7
    logits = torch.randn(3, 1, 9, 11, generator=torch.Generator().manual_seed(1)) * 4
    coords = [uncertain_point_coords_with_randomness(
        logits, num_points=num_points, oversample_ratio=oversample_ratio,
        importance_sample_ratio=0.75, generator=torch.Generator().manual_seed(seed),
        point_selector=selector) for selector in (None, select_uncertain_points)]
    k = int(0.75 * num_points)
    for r in range(3):
        assert (sorted(map(tuple, coords[1][r, :k].tolist()))
                == sorted(map(tuple, coords[0][r, :k].tolist())))
    assert torch.equal(coords[1][:, k:], coords[0][:, k:])
    with pytest.raises(ValueError, match="either it or an uncertainty_fn"):
        uncertain_point_coords_with_randomness(
            logits, num_points=4, oversample_ratio=2, importance_sample_ratio=0.5,
            uncertainty_fn=lambda s: s, point_selector=select_uncertain_points)


# ----------------------------------------------------------------------------- channels_last AdamW

def test_adamw_updates_channels_last_weights_in_place_as_torch_does():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    twin = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    twin.load_state_dict(conv.state_dict())
    ours = ChannelsLastAdamW(conv.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    stock = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(3):
        x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
        for net, opt in ((conv, ours), (twin, stock)):
            opt.zero_grad()
            net(x).square().mean().backward()
            if step == 2:  # the kernel gets storage-order views: no copies of the weight
                with torch.profiler.profile() as prof:
                    opt.step()
                if opt is ours:
                    names = {e.name for e in prof.events()}
                    assert "aten::_fused_adamw_" in names and "aten::clone" not in names
            else:
                opt.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv.weight, twin.weight, rtol=1e-6, atol=1e-7)
    moments = ours.state[conv.weight]["exp_avg"]
    assert moments.shape == conv.weight.shape
    torch.testing.assert_close(moments, stock.state[twin.weight]["exp_avg"])
    # its state_dict is torch's: it loads into a stock AdamW
    torch.optim.AdamW(conv.parameters(), lr=1e-2).load_state_dict(ours.state_dict())


def test_adamw_matches_torch_fused_adamw_on_the_model():
    torch.manual_seed(0)
    nets = [build_model("tiny").train() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [ChannelsLastAdamW(nets[0].parameters(), lr=1e-3, weight_decay=0.05, amsgrad=True),
            torch.optim.AdamW(nets[1].parameters(), lr=1e-3, weight_decay=0.05, amsgrad=True,
                              fused=True)]
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255
    for _ in range(2):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(images)["pred_masks"].sigmoid().mean().backward()
            opt.step()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(a, b), name
    assert opts[0].state_dict()["state"].keys() == opts[1].state_dict()["state"].keys()
    assert not math.isnan(float(opts[0].state_dict()["state"][0]["step"]))
