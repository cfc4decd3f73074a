"""model.conv: the Winograd F(2x2, 3x3) path against F.conv2d, and where Conv2d takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import conv
from model.backbone import build_backbone
from model.config import BackboneConfig
from model.ops import has_compiled_op

pytestmark = pytest.mark.skipif(not has_compiled_op(), reason="needs the compiled extension")

CL = torch.channels_last


def _inputs(B, C, c_out, H, W, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype).contiguous(memory_format=CL)
    w = torch.randn(c_out, C, 3, 3, generator=g, dtype=dtype) / (3 * C ** 0.5)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return x, w, b


# odd and even sizes (a last tile half off the map), one pixel, one channel, B > 1
@pytest.mark.parametrize("shape", [(2, 3, 5, 5, 7), (1, 4, 2, 6, 6), (2, 8, 8, 1, 1),
                                   (1, 1, 3, 2, 3), (3, 16, 24, 9, 4)])
def test_winograd_equals_conv2d_forward_and_backward_float64(shape):
    x, w, b = _inputs(*shape, torch.float64)
    params = [t.requires_grad_() for t in (x, w, b)]
    got = conv.winograd_conv3x3(x, w, b)
    want = F.conv2d(x, w, b, stride=1, padding=1)
    assert got.shape == want.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, params, grad),
                    torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_winograd_float32_error_is_rounding_sized():
    x, w, _ = _inputs(2, 64, 64, 32, 32, torch.float32, bias=False)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    for y in (conv.winograd_conv3x3(x, w), F.conv2d(x, w, padding=1)):
        assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5


def test_winograd_accepts_contiguous_input():
    x, w, b = _inputs(2, 5, 4, 7, 6, torch.float64)
    torch.testing.assert_close(conv.winograd_conv3x3(x.contiguous(), w, b),
                               F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)


def test_winograd_gradcheck():
    x, w, b = _inputs(1, 2, 3, 5, 4, torch.float64)
    assert torch.autograd.gradcheck(conv.winograd_conv3x3,
                                    (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("op,args", [
    ("winograd_f23_input", lambda: (torch.randn(2, 3, 5, 4).contiguous(memory_format=CL),)),
    ("winograd_f23_output", lambda: (torch.randn(16, 2 * 3 * 2, 4), [2, 4, 5, 4])),
])
def test_winograd_ops_pass_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.panoray, op).default, args())


def test_winograd_ops_refuse_bad_shapes():
    with pytest.raises(RuntimeError, match=r"must be \(B, C, H, W\)"):
        torch.ops.panoray.winograd_f23_input(torch.randn(3, 5, 4))
    with pytest.raises(RuntimeError, match=r"expected the transformed tiles as \(16, 12, 4\)"):
        torch.ops.panoray.winograd_f23_output(torch.randn(16, 11, 4), [2, 4, 5, 4])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.panoray.winograd_f23_input(torch.zeros(1, 2, 3, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must not be empty"):
        torch.ops.panoray.winograd_f23_input(torch.zeros(1, 2, 0, 3))


def test_conv2d_takes_the_winograd_path_only_where_it_applies(monkeypatch):
    calls = []
    real = conv.winograd_conv3x3
    monkeypatch.setattr(conv, "winograd_conv3x3", lambda *a: calls.append(1) or real(*a))

    def winograd(m, x):
        calls.clear()
        torch.testing.assert_close(
            m(x), F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation),
            rtol=1e-5, atol=1e-5)
        return bool(calls)

    torch.manual_seed(0)
    m = conv.Conv2d(8, 6, 3, padding=1).to(memory_format=CL)
    big = torch.randn(2, 8, 16, 16).contiguous(memory_format=CL)  # 2 * 8 * 8 = 128 tiles
    assert winograd(m, big)
    assert not winograd(m, big[:, :, :14, :14])  # 98 tiles
    for other in (conv.Conv2d(8, 6, 3, padding=1, stride=2),
                  conv.Conv2d(8, 6, 3, padding=2, dilation=2), conv.Conv2d(8, 6, 3)):
        assert not winograd(other, big)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        calls.clear()
        m(big)
        assert calls == []
    with torch.no_grad():  # inference keeps the direct convolution
        assert not winograd(m, big)
    frozen = conv.Conv2d(8, 6, 3, padding=1).requires_grad_(False)
    assert not winograd(frozen, big)  # nothing to differentiate
    assert winograd(m.double(), big.double())


def test_resnet_backbone_runs_winograd_with_torchvision_names():
    backbone = build_backbone(BackboneConfig(kind="resnet", depth=18))
    convs = {n: type(m) for n, m in backbone.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for name in ("layer1.0.conv1", "layer2.0.conv2", "layer4.1.conv1"):
        assert convs[name] is conv.Conv2d
    # the 7x7 stem, the stride-2 and the 1x1 layers keep nn.Conv2d
    for name in ("conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        assert convs[name] is torch.nn.Conv2d
    assert "layer1.0.conv1.weight" in backbone.state_dict()
