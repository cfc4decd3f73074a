"""`Conv2d`: nn.Conv2d with two faster CPU paths; same parameters, state_dict keys and results.

- 1x1, stride 1, on a channels_last map: exactly a linear layer over the channel axis of the
  (B, H, W, C) rows, run as one GEMM (no copy in or out; one GEMM forward, two backward).
  PyTorch itself sends small-batch 1x1 convolutions on one CPU thread to its unblocked fallback,
  which first copies a channels_last input to contiguous (forward and backward).
- 3x3, stride 1, padding 1, in training on the CPU (float32 / float64, autograd recording the
  convolution): Winograd F(2x2, 3x3). The map is cut into 2x2-pixel output tiles; the compiled
  data transforms (csrc/cpu/winograd_cpu.cpp) turn every tile's 4x4 input patch into 16 numbers
  per channel, a batched matrix product over the 16 positions mixes the channels with the
  transformed filters, and the output transform makes the 2x2 pixels again. 2.25x fewer
  multiplications than the direct convolution, in both directions: the backward is autograd
  through the same three steps (the transforms' adjoints are compiled too). Results differ from
  the direct convolution by float rounding only (about 1e-6 relative in float32).

  Forward + backward against oneDNN's direct convolution (channels_last, batch 2, one thread):
  1.2x (64 channels, 32 x 32) to 2.3x (512 channels, 32 x 32); even at 64 tiles and slower
  below, hence `MIN_WINOGRAD_TILES`. Inference keeps the direct convolution: forward alone
  measured about even (r50 at 384 x 384, 2 threads), and so its rounding stays that of other
  PyTorch implementations.

Other shapes, layouts and devices take nn.Conv2d's own path (cuDNN picks its own algorithms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.ops import has_compiled_op

# Fewest 2x2 output tiles (B * ceil(H / 2) * ceil(W / 2)) for which the Winograd path is faster.
MIN_WINOGRAD_TILES = 128

# F(2x2, 3x3)'s filter transform G (4 x 3); the input transform B^T and the output transform A^T
# live in the compiled kernels.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_filter_transforms: dict[torch.dtype, Tensor] = {}


def _filter_transform(dtype: torch.dtype) -> Tensor:
    """(16, 9): row 4a + b maps a flattened 3x3 filter g to (G g G^T)[a][b]."""
    if dtype not in _filter_transforms:
        g = torch.tensor(_G, dtype=torch.float64)
        _filter_transforms[dtype] = torch.einsum("ai,bj->abij", g, g).reshape(16, 9).to(dtype)
    return _filter_transforms[dtype]


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, stride=1, padding=1) by Winograd F(2x2, 3x3); CPU only.

    x (B, C, H, W), best channels_last (others are copied to it); weight (C_out, C, 3, 3).
    Returns (B, C_out, H, W) in channels_last memory. Differentiable in x, weight and bias.
    """
    B, C, H, W = x.shape
    c_out = weight.shape[0]
    v = torch.ops.panoray.winograd_f23_input(x)  # (16, T, C)
    # (16, C, C_out) as a transposed view: the batched product reads it without a copy
    u = (_filter_transform(weight.dtype) @ weight.reshape(c_out * C, 9).t()).view(16, c_out, C)
    y = torch.ops.panoray.winograd_f23_output(torch.bmm(v, u.transpose(1, 2)),
                                              [B, c_out, H, W])
    return y if bias is None else y + bias.view(1, c_out, 1, 1)


class Conv2d(nn.Conv2d):
    """nn.Conv2d with the CPU paths described in this module."""

    def forward(self, x: Tensor) -> Tensor:
        if (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and self.groups == 1 and x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last)):
            rows = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
            return rows.permute(0, 3, 1, 2)  # (B, C_out, H, W), channels_last
        if self._winograd_applies(x):
            return winograd_conv3x3(x, self.weight, self.bias)
        return super().forward(x)

    def _winograd_applies(self, x: Tensor) -> bool:
        if (self.kernel_size != (3, 3) or self.stride != (1, 1) or self.padding != (1, 1)
                or self.dilation != (1, 1) or self.groups != 1 or self.padding_mode != "zeros"
                or x.dim() != 4 or x.device.type != "cpu"
                or x.dtype not in (torch.float32, torch.float64)
                or self.weight.dtype != x.dtype or torch.is_autocast_enabled("cpu")
                or not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or not has_compiled_op()):
            return False
        B, _, H, W = x.shape
        return B * ((H + 1) // 2) * ((W + 1) // 2) >= MIN_WINOGRAD_TILES


def adopt_winograd(module: nn.Module) -> nn.Module:
    """Give the plain 3x3, stride-1 nn.Conv2d layers inside `module` the Winograd path, in place.

    Only the class changes (parameters, buffers and state_dict keys stay), so modules built by
    other libraries, such as torchvision's ResNet, keep their structure and weight names. Other
    layers are left alone: their arithmetic stays PyTorch's own.
    """
    for m in module.modules():
        if type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1):
            m.__class__ = Conv2d
    return module
