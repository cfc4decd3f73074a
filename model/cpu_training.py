"""Opt-in speed-ups for training on CPUs; the model itself is plain PyTorch without them.

    net = build_model("tiny").train()
    accelerate_cpu_training(net)                      # in place; keys stay
    criterion = build_criterion(LossConfig(), num_classes=K,
                                point_selector=select_uncertain_points)
    optimizer = build_optimizer(net, lr=1e-4, adamw=ChannelsLastAdamW)

`accelerate_cpu_training` changes the class of some layers in place (their parameters, buffers,
names and state_dict keys stay; `isinstance(m, nn.Conv2d)` / `nn.GroupNorm` still holds), and
each swapped layer takes PyTorch's own path whenever its fast one does not apply (other devices
and dtypes, autocast, inference for the Winograd convolutions). Results differ from the plain
layers' by float rounding only:

- `MatmulConv1x1`: a 1x1, stride-1 convolution of a channels_last map is exactly a linear
  layer over the channel axis of the (B, H, W, C) rows, run as one GEMM (no copy in or out; one
  GEMM forward, two backward). PyTorch itself sends small-batch 1x1 convolutions on one CPU
  thread to its unblocked fallback, which first copies a channels_last input to contiguous.
- `WinogradConv3x3`: a 3x3, stride-1, padding-1 convolution in training on the CPU (float32 /
  float64, autograd recording it) by Winograd F(2x2, 3x3). The map is cut into 2x2-pixel output
  tiles; the compiled data transforms (csrc/cpu/winograd_f23_cpu.cpp) turn every tile's 4x4
  input patch into 16 numbers per channel, a batched matrix product over the 16 positions mixes
  the channels with the transformed filters, and the output transform makes the 2x2 pixels
  again. 2.25x fewer multiplications than the direct convolution, in both directions: the
  backward is autograd through the same three steps (the transforms' adjoints are compiled
  too); about 1e-6 relative from the direct convolution in float32. Forward + backward against
  oneDNN's direct convolution (channels_last, batch 2, one thread): 1.2x (64 channels, 32 x 32)
  to 2.3x (512 channels, 32 x 32); even at 64 tiles and slower below, hence
  `MIN_WINOGRAD_TILES`. Inference keeps the direct convolution (forward alone measured about
  even), so its rounding stays that of other PyTorch implementations.
- `ChannelsLastGroupNorm`: PyTorch's CPU GroupNorm is slow on channels_last maps (its backward
  several times slower than on contiguous ones: 30 ms vs 4 ms for 2 x 64 x 128 x 128), and
  copying to contiguous and back costs more than the norm; the compiled kernels read the map in
  its own memory order (two passes each way, statistics summed in float64).
- `ChannelsLastAdamW`: torch's fused AdamW kernel wants contiguous tensors: for a channels_last
  convolution weight it copies the weight, its gradient and both moments to contiguous ones and
  back, every step (about 20 ms a step for `tiny` on one CPU thread, more than the update
  itself). AdamW is elementwise, so this one hands the kernel contiguous views of the same
  memory instead. (Contiguous weights would avoid the copies too, but then every convolution
  reorders its weight in the forward and its weight gradient in the backward: slower.)
- `select_uncertain_points`: the loss's importance sampling in one compiled pass per mask (the
  same points as grid_sample + top-k + gather; about 2.4x faster on 6 masks x 37632 candidates,
  one thread). The criterion takes it explicitly (`point_selector=`).

Without the compiled extension (``model._C``) only `MatmulConv1x1` is installed and
`select_uncertain_points` takes the PyTorch path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.adamw import adamw

from model import cpu_ops
from model.ops import has_compiled_op
from model.pixel_decoder import ConvNorm
from model.point_sampling import topk_uncertain_points

# Fewest 2x2 output tiles (B * ceil(H / 2) * ceil(W / 2)) for which the Winograd path is faster.
MIN_WINOGRAD_TILES = 128

# F(2x2, 3x3)'s filter transform G (4 x 3); the input transform B^T and the output transform A^T
# live in the compiled kernels.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_filter_transforms: dict[torch.dtype, Tensor] = {}
_FLOATS = (torch.float32, torch.float64)


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
    v = cpu_ops.winograd_f23_input(x)  # (16, T, C)
    # (16, C, C_out) as a transposed view: the batched product reads it without a copy
    u = (_filter_transform(weight.dtype) @ weight.reshape(c_out * C, 9).t()).view(16, c_out, C)
    y = cpu_ops.winograd_f23_output(torch.bmm(v, u.transpose(1, 2)), [B, c_out, H, W])
    return y if bias is None else y + bias.view(1, c_out, 1, 1)


class MatmulConv1x1(nn.Conv2d):
    """A 1x1, stride-1, ungrouped nn.Conv2d that runs channels_last maps as one GEMM."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            rows = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
            return rows.permute(0, 3, 1, 2)  # (B, C_out, H, W), channels_last
        return super().forward(x)


class WinogradConv3x3(nn.Conv2d):
    """A 3x3, stride-1, padding-1, ungrouped nn.Conv2d that trains on the CPU by Winograd."""

    def forward(self, x: Tensor) -> Tensor:
        if self._winograd_applies(x):
            return winograd_conv3x3(x, self.weight, self.bias)
        return super().forward(x)

    def _winograd_applies(self, x: Tensor) -> bool:
        if (x.dim() != 4 or x.device.type != "cpu" or x.dtype not in _FLOATS
                or self.weight.dtype != x.dtype or torch.is_autocast_enabled("cpu")
                or not (torch.is_grad_enabled()
                        and (x.requires_grad or self.weight.requires_grad))):
            return False
        B, _, H, W = x.shape
        return B * ((H + 1) // 2) * ((W + 1) // 2) >= MIN_WINOGRAD_TILES


# The pixel decoder's conv + norm layers: ConvNorm.forward's super().forward(x) reaches the fast
# convolution's forward through the method resolution order.
class MatmulConvNorm1x1(ConvNorm, MatmulConv1x1):
    """ConvNorm with MatmulConv1x1's convolution."""


class WinogradConvNorm3x3(ConvNorm, WinogradConv3x3):
    """ConvNorm with WinogradConv3x3's convolution."""


class ChannelsLastGroupNorm(nn.GroupNorm):
    """An affine nn.GroupNorm that runs float32 / float64 channels_last CPU maps by the compiled
    kernels, in their own memory order."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in _FLOATS
                and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
                and self.weight.dtype == x.dtype and not torch.is_autocast_enabled("cpu")):
            return cpu_ops.group_norm_nhwc(x, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(x)


def select_uncertain_points(coarse_logits: Tensor, candidates: Tensor, k: int) -> Tensor:
    """A `point_selector` for the criterion: the k of `candidates` (R, K, 2) where
    `coarse_logits` (R, 1, h, w) are closest to 0 -> (R, k, 2).

    The compiled kernel for float32 CPU logits (candidate order), `topk_uncertain_points`
    otherwise; the same set either way.
    """
    if (coarse_logits.device.type == "cpu" and coarse_logits.dtype == torch.float32
            and coarse_logits.shape[1] == 1 and has_compiled_op()):
        return cpu_ops.most_uncertain_points(coarse_logits[:, 0], candidates, k)
    return topk_uncertain_points(coarse_logits, candidates, k)


def _storage_order(t: Tensor) -> list[int] | None:
    """The dim order that makes `t` a contiguous view (e.g. (0, 2, 3, 1) for channels_last), or
    None when `t` is contiguous already or is not a dense permutation of its memory."""
    if t.dim() < 2 or t.is_contiguous():
        return None
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else None


class ChannelsLastAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with the fused kernel (always), run in place on channels_last weights.

    A parameter whose gradient and moments are laid out like itself goes to the kernel
    (`torch.optim.adamw.adamw`) permuted into storage order. Same update, same state tensors
    and state_dict as torch.optim.AdamW(fused=True): either loads the other's state.
    """

    def __init__(self, params: Iterable, **kwargs) -> None:
        super().__init__(params, **{**kwargs, "fused": True})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs: parallel lists
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
            steps = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # torch.optim.AdamW's state, as its fused path makes it
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format)
                tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"]]
                if group["amsgrad"]:
                    tensors.append(state["max_exp_avg_sq"])
                order = _storage_order(p)
                if order is not None and all(t.stride() == p.stride() for t in tensors):
                    tensors = [t.permute(order) for t in tensors]
                for lst, t in zip(lists, tensors):
                    lst.append(t)
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            adamw(*lists, steps, foreach=False, capturable=group["capturable"],
                  differentiable=group["differentiable"], fused=True,
                  grad_scale=getattr(self, "grad_scale", None),
                  found_inf=getattr(self, "found_inf", None), amsgrad=group["amsgrad"],
                  beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=group["maximize"])
        return loss


def _is_1x1(m: nn.Conv2d) -> bool:
    return m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0) and m.groups == 1


def _is_3x3(m: nn.Conv2d) -> bool:
    return (m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def accelerate_cpu_training(net: nn.Module) -> nn.Module:
    """Give the layers of `net` that have one their CPU training path, in place; returns `net`.

    Swaps the class of plain nn.Conv2d / ConvNorm layers of the shapes above and of affine
    nn.GroupNorm layers (see the module docstring). Parameters, buffers and state_dict keys stay
    the same objects, so an optimizer or DDP wrapper built before or after keeps working, and
    bundles save and load as usual. Applying it twice changes nothing more.
    """
    compiled = has_compiled_op()
    for m in net.modules():
        if type(m) in (nn.Conv2d, ConvNorm):
            plain = type(m) is nn.Conv2d
            if _is_1x1(m):
                m.__class__ = MatmulConv1x1 if plain else MatmulConvNorm1x1
            elif _is_3x3(m) and compiled:
                m.__class__ = WinogradConv3x3 if plain else WinogradConvNorm3x3
        elif type(m) is nn.GroupNorm and m.affine and compiled:
            m.__class__ = ChannelsLastGroupNorm
    return net
