"""Multi-scale deformable attention: the compiled op from ``csrc/`` and its PyTorch reference.

``ms_deform_attn`` runs ``torch.ops.panoray.ms_deform_attn`` (CPU kernel always, CUDA kernel when
the extension was built with a CUDA toolkit). When ``model._C`` cannot be imported it falls back
to ``ms_deform_attn_reference`` and logs one warning.

Shapes, used by every function here:

- ``value``: ``B x S x nH x C``, the flattened feature maps of all levels, ``S = sum(h_l * w_l)``
- ``spatial_shapes``: ``L x 2`` int64, ``(h_l, w_l)`` per level
- ``level_start_index``: ``L`` int64, where each level starts in ``S`` (exclusive cumsum)
- ``sampling_locations``: ``B x Q x nH x L x P x 2``, ``(x, y)`` normalised to ``[0, 1]``
- ``attention_weights``: ``B x Q x nH x L x P``
- output: ``B x Q x (nH * C)``

Sampling is bilinear with zero padding and ``align_corners=False`` (pixel coordinate
``loc * size - 0.5``), the semantics of Deformable-DETR's and Mask2Former's op.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

try:
    from model import _C  # noqa: F401  (importing it registers torch.ops.panoray)

    _HAS_C = True
except ImportError as _err:  # the extension was not built
    _HAS_C = False
    _IMPORT_ERROR: str = str(_err)
else:
    _IMPORT_ERROR = ""

_warned_fallback = False

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def has_compiled_op() -> bool:
    """Whether the compiled op (``model._C``) is loaded; if not, ``ms_deform_attn`` falls back."""
    return _HAS_C


def has_cuda_kernel() -> bool:
    """Whether the compiled op has a CUDA kernel (the extension was built with a CUDA toolkit)."""
    return _HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(
        "panoray::ms_deform_attn", "CUDA"
    )


def _common_float(
    value: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Promote the three float inputs to one dtype (as PyTorch's binary ops would)."""
    dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    return value.to(dtype), sampling_locations.to(dtype), attention_weights.to(dtype)


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention written with ``F.grid_sample``: the test oracle.

    value ``B x S x nH x C``; spatial_shapes ``L x 2`` (h, w); sampling_locations
    ``B x Q x nH x L x P x 2`` (x, y in [0, 1]); attention_weights ``B x Q x nH x L x P``.
    Returns ``B x Q x (nH * C)``. Differentiable through autograd; slow and memory hungry.
    """
    B, S, nH, C = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    value, sampling_locations, attention_weights = _common_float(
        value, sampling_locations, attention_weights
    )
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (B, h*w, nH, C) -> (B*nH, C, h, w)
        v = values[level].flatten(2).transpose(1, 2).reshape(B * nH, C, h, w)
        # (B, Q, nH, P, 2) -> (B*nH, Q, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*nH, C, Q, P)
    # (B, Q, nH, L, P) -> (B*nH, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(B * nH, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*nH, C, Q)
    return out.view(B, nH * C, Q).transpose(1, 2).contiguous()


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    check_level_values: bool,
) -> None:
    """Raise TypeError / ValueError with a one-sentence reason for inputs the op cannot take."""
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(
                f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}."
            )
    for name in ("value", "sampling_locations", "attention_weights"):
        if named[name].dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"ms_deform_attn: {name} must be float16/bfloat16/float32/float64, "
                f"got {named[name].dtype}; convert it with .float()."
            )
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype != torch.int64:
            raise TypeError(
                f"ms_deform_attn: {name} must be int64, got {named[name].dtype}; "
                "convert it with .long()."
            )
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"ms_deform_attn: all inputs must be on one device, got {where}.")
    if value.dim() != 4:
        raise ValueError(
            f"ms_deform_attn: value must be (B, S, nH, C), got shape {tuple(value.shape)}."
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (B, Q, nH, L, P, 2), "
            f"got shape {tuple(sampling_locations.shape)}."
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            "ms_deform_attn: attention_weights must be (B, Q, nH, L, P), "
            f"got shape {tuple(attention_weights.shape)}."
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            "ms_deform_attn: spatial_shapes must be (L, 2) rows of (h, w), "
            f"got shape {tuple(spatial_shapes.shape)}."
        )
    B, S, nH, C = value.shape
    L = spatial_shapes.shape[0]
    expected_loc = (B, sampling_locations.shape[1], nH, L, sampling_locations.shape[4], 2)
    if tuple(sampling_locations.shape) != expected_loc:
        raise ValueError(
            f"ms_deform_attn: sampling_locations has shape {tuple(sampling_locations.shape)} but "
            f"value (B={B}, nH={nH}) and spatial_shapes (L={L}) need {expected_loc}."
        )
    if tuple(attention_weights.shape) != expected_loc[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights has shape {tuple(attention_weights.shape)}, "
            f"expected {expected_loc[:5]} to match sampling_locations."
        )
    if tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must have shape ({L},) like spatial_shapes' "
            f"levels, got {tuple(level_start_index.shape)}."
        )
    # Value-dependent checks read spatial_shapes; skip them while tracing (torch.compile,
    # fake tensors), where the C++ kernel checks the same on CPU at run time.
    if (
        not check_level_values
        or torch.compiler.is_compiling()
        or _is_fake(spatial_shapes)
        or _is_fake(level_start_index)
    ):
        return
    shapes = spatial_shapes.tolist()
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive, got {shapes}.")
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(
            f"ms_deform_attn: value has S={S} tokens but spatial_shapes {shapes} sum to {total}; "
            "pass the shapes of the levels flattened into value."
        )
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    if level_start_index.tolist() != starts:
        raise ValueError(
            f"ms_deform_attn: level_start_index {level_start_index.tolist()} does not match "
            f"spatial_shapes (expected {starts}); compute it as the exclusive cumsum of h * w."
        )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int = 64,
    *,
    check_level_values: bool = True,
) -> Tensor:
    """Multi-scale deformable attention (Deformable-DETR / Mask2Former semantics).

    value ``B x S x nH x C``; spatial_shapes ``L x 2`` int64 (h, w); level_start_index ``L``
    int64; sampling_locations ``B x Q x nH x L x P x 2`` (x, y in [0, 1]); attention_weights
    ``B x Q x nH x L x P``. Returns ``B x Q x (nH * C)`` in the inputs' dtype.

    Inputs are validated (TypeError / ValueError say what is wrong). Non-contiguous inputs are
    made contiguous (a copy), and float inputs of mixed dtypes are promoted to a common dtype
    the way PyTorch's binary ops do (e.g. bfloat16 value with float32 locations -> float32).
    ``im2col_step`` is the number of batch elements per CUDA kernel launch (kept for
    compatibility with Deformable-DETR's signature); the CPU kernel ignores it.
    Differentiable with respect to value, sampling_locations and attention_weights.

    ``check_level_values`` checks that spatial_shapes and level_start_index tile value's S axis;
    on CUDA that reads them back to the host (a synchronisation). Pass False where they are
    known to be right; the CUDA kernels still never read outside value, and the CPU kernel
    always checks. The check is skipped while tracing (torch.compile, fake tensors).
    """
    _check_inputs(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        check_level_values=check_level_values,
    )
    if not isinstance(im2col_step, int) or im2col_step <= 0:
        raise ValueError(
            f"ms_deform_attn: im2col_step must be a positive int, got {im2col_step!r}."
        )
    value, sampling_locations, attention_weights = _common_float(
        value, sampling_locations, attention_weights
    )
    if not _HAS_C:
        _warn_fallback()
        return ms_deform_attn_reference(
            value, spatial_shapes, sampling_locations, attention_weights
        )
    return torch.ops.panoray.ms_deform_attn.default(
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        im2col_step,
    )


def _warn_fallback() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        log.warning(
            "panoray's compiled ms_deform_attn (model._C) is not available (%s); using the slow "
            "grid_sample reference. Build it with `pip install --no-build-isolation -e .`.",
            _IMPORT_ERROR,
        )


if _HAS_C:

    @torch.library.register_fake("panoray::ms_deform_attn")
    def _ms_deform_attn_fake(
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int,
    ) -> Tensor:
        B, _, nH, C = value.shape
        Q = sampling_locations.shape[1]
        return value.new_empty((B, Q, nH * C))

    @torch.library.register_fake("panoray::ms_deform_attn_backward")
    def _ms_deform_attn_backward_fake(
        grad_output: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return (
            torch.empty_like(value),
            torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights),
        )

    def _setup_context(ctx, inputs, output) -> None:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step = (
            inputs
        )
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        ctx.im2col_step = step

    def _backward(ctx, grad_output: Tensor):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_locations, grad_weights = (
            torch.ops.panoray.ms_deform_attn_backward.default(
                grad_output.contiguous(),
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
                ctx.im2col_step,
            )
        )
        return grad_value, None, None, grad_locations, grad_weights, None

    torch.library.register_autograd(
        "panoray::ms_deform_attn", _backward, setup_context=_setup_context
    )
