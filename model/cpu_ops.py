"""The CPU helper ops behind `model.cpu_training`: typed wrappers, fake kernels and autograd.

The kernels live in ``csrc/cpu/`` (schemas in ``csrc/<op>.cpp``), CPU only, float32 / float64
unless stated; `has_compiled_op()` says whether ``model._C`` is loaded, and callers take a
PyTorch path without it or on other devices.

- ``panoray::most_uncertain_points(logits, candidates, k)``: logits ``R x h x w``, candidates
  ``R x K x 2`` (x, y in [0, 1]) -> ``R x k x 2``, the k candidates with the smallest
  ``|bilinear logit|`` (align_corners=False, zero padding), in candidate order; float32.
- ``panoray::group_norm_nhwc(x, weight, bias, groups, eps) -> (y, mean, rstd)``: GroupNorm of
  a channels_last ``B x C x H x W`` map in its own memory order; mean and rstd ``B x groups``.
  Differentiable in x, weight and bias (registered below).
- ``panoray::winograd_f23_input(x) -> V`` and ``panoray::winograd_f23_output(M, size) -> y``:
  the data transforms of a Winograd F(2x2, 3x3) convolution of a channels_last map:
  x ``B x C x H x W`` -> V ``16 x T x C`` with T the 2x2 output tiles
  (``B * ceil(H / 2) * ceil(W / 2)``), and M ``16 x T x C_out`` -> y ``size`` channels_last.
  Both are linear, so each one's backward is its adjoint op (``..._backward``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.ops import has_compiled_op


def most_uncertain_points(logits: Tensor, candidates: Tensor, k: int) -> Tensor:
    """The k of `candidates` (R x K x 2) where `logits` (R x h x w, float32, CPU) are closest to
    0, in candidate order: R x k x 2."""
    return torch.ops.panoray.most_uncertain_points.default(logits, candidates, k)


def group_norm_nhwc(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """GroupNorm of a channels_last CPU map x (B x C x H x W) by the compiled kernel; weight and
    bias (C,). Returns B x C x H x W, channels_last."""
    return torch.ops.panoray.group_norm_nhwc.default(x, weight, bias, groups, eps)[0]


def winograd_f23_input(x: Tensor) -> Tensor:
    """x (B x C x H x W, best channels_last) -> V (16 x T x C), V[4k + l] = (B^T d B)[k][l]."""
    return torch.ops.panoray.winograd_f23_input.default(x)


def winograd_f23_output(m: Tensor, size: list[int]) -> Tensor:
    """M (16 x T x C_out) -> y of `size` (B, C_out, H, W), channels_last: y_tile = A^T M A."""
    return torch.ops.panoray.winograd_f23_output.default(m, size)


def _winograd_tiles(size, channels: int) -> tuple[int, int, int]:
    B, _, H, W = size
    return (16, B * ((H + 1) // 2) * ((W + 1) // 2), channels)


def _channels_last_map(like: Tensor, size) -> Tensor:
    return like.new_empty(size).contiguous(memory_format=torch.channels_last)


if has_compiled_op():

    @torch.library.register_fake("panoray::most_uncertain_points")
    def _most_uncertain_points_fake(logits: Tensor, candidates: Tensor, k: int) -> Tensor:
        return candidates.new_empty((candidates.shape[0], k, 2))

    @torch.library.register_fake("panoray::group_norm_nhwc")
    def _group_norm_nhwc_fake(
        x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        stats = x.new_empty((x.shape[0], groups))
        return _channels_last_map(x, x.shape), stats, torch.empty_like(stats)

    @torch.library.register_fake("panoray::group_norm_nhwc_backward")
    def _group_norm_nhwc_backward_fake(
        grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, groups: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _channels_last_map(x, x.shape), torch.empty_like(weight), torch.empty_like(weight)

    def _group_norm_setup_context(ctx, inputs, output) -> None:
        x, weight, _, groups, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.groups = groups

    def _group_norm_backward(ctx, grad_y: Tensor, _grad_mean, _grad_rstd):
        x, mean, rstd, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.panoray.group_norm_nhwc_backward.default(
            grad_y, x, mean, rstd, weight, ctx.groups)
        return grad_x, grad_weight, grad_bias, None, None

    torch.library.register_autograd(
        "panoray::group_norm_nhwc", _group_norm_backward,
        setup_context=_group_norm_setup_context)

    @torch.library.register_fake("panoray::winograd_f23_input")
    def _winograd_input_fake(x: Tensor) -> Tensor:
        return x.new_empty(_winograd_tiles(x.shape, x.shape[1]))

    @torch.library.register_fake("panoray::winograd_f23_input_backward")
    def _winograd_input_backward_fake(grad_v: Tensor, size: list[int]) -> Tensor:
        return _channels_last_map(grad_v, size)

    @torch.library.register_fake("panoray::winograd_f23_output")
    def _winograd_output_fake(m: Tensor, size: list[int]) -> Tensor:
        return _channels_last_map(m, size)

    @torch.library.register_fake("panoray::winograd_f23_output_backward")
    def _winograd_output_backward_fake(grad_y: Tensor) -> Tensor:
        return grad_y.new_empty(_winograd_tiles(grad_y.shape, grad_y.shape[1]))

    def _winograd_input_setup_context(ctx, inputs, output) -> None:
        ctx.size = list(inputs[0].shape)

    def _winograd_input_backward(ctx, grad_v: Tensor):
        return torch.ops.panoray.winograd_f23_input_backward.default(grad_v, ctx.size)

    def _winograd_output_backward(ctx, grad_y: Tensor):
        return torch.ops.panoray.winograd_f23_output_backward.default(grad_y), None

    torch.library.register_autograd(
        "panoray::winograd_f23_input", _winograd_input_backward,
        setup_context=_winograd_input_setup_context)
    torch.library.register_autograd("panoray::winograd_f23_output", _winograd_output_backward)
