"""The compiled multi-scale deformable attention op against its grid_sample reference.

Inputs are random and fresh on every run; a failing comparison prints the seed that reproduces
it (``sample_inputs(..., seed=...)``).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass

import pytest
import torch

from model import ops
from model.ops import ms_deform_attn, ms_deform_attn_reference

requires_cuda_device = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"
)


@dataclass
class Sample:
    value: torch.Tensor  # (B, S, nH, C)
    spatial_shapes: torch.Tensor  # (L, 2)
    level_start_index: torch.Tensor  # (L,)
    sampling_locations: torch.Tensor  # (B, Q, nH, L, P, 2)
    attention_weights: torch.Tensor  # (B, Q, nH, L, P)
    seed: int

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.value,
            self.spatial_shapes,
            self.level_start_index,
            self.sampling_locations,
            self.attention_weights,
        )


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def level_start(shapes: list[tuple[int, int]]) -> list[int]:
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return starts


def sample_inputs(
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
    *,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
    heads: int = 2,
    channels: int = 8,
    shapes: tuple[tuple[int, int], ...] = ((6, 5), (3, 3), (1, 4)),
    points: int = 3,
    queries: int = 7,
    seed: int | None = None,
    avoid_kinks: bool = False,
) -> Sample:
    """Random op inputs. Locations spread over [-0.15, 1.15] (some outside the maps), a few put
    exactly on the borders 0 and 1. ``avoid_kinks`` keeps every pixel coordinate at least 0.05
    from an integer, where bilinear sampling is not differentiable (for gradcheck)."""
    seed = fresh_seed() if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(batch, S, heads, channels, generator=gen, dtype=torch.float64)
    loc = torch.rand(batch, queries, heads, L, points, 2, generator=gen, dtype=torch.float64)
    loc = loc * 1.3 - 0.15
    if not avoid_kinks:
        border = torch.rand(loc.shape, generator=gen) < 0.1
        loc = torch.where(border, (torch.rand(loc.shape, generator=gen) < 0.5).double(), loc)
    else:
        size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[:, None, :]
        pixel = loc * size - 0.5
        near = (pixel - pixel.round()).abs() < 0.05
        loc = torch.where(near, loc + 0.1 / size, loc)
    weights = torch.rand(batch, queries, heads, L, points, generator=gen, dtype=torch.float64)
    floats = [t.to(device=device, dtype=dtype) for t in (value, loc, weights)]
    if requires_grad:
        floats = [t.requires_grad_() for t in floats]
    return Sample(
        value=floats[0],
        spatial_shapes=torch.tensor(shapes, dtype=torch.int64, device=device),
        level_start_index=torch.tensor(level_start(list(shapes)), dtype=torch.int64, device=device),
        sampling_locations=floats[1],
        attention_weights=floats[2],
        seed=seed,
    )


def reference_outputs(sample: Sample, grad_output: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients (value, locations, weights) of the float64 reference."""
    value, loc, weights = (
        t.detach().double().requires_grad_()
        for t in (sample.value, sample.sampling_locations, sample.attention_weights)
    )
    out = ms_deform_attn_reference(value, sample.spatial_shapes, loc, weights)
    grads = torch.autograd.grad(out, (value, loc, weights), grad_output.double())
    return [out.detach(), *grads]


def op_outputs(sample: Sample, grad_output: torch.Tensor) -> list[torch.Tensor]:
    value, loc, weights = (
        t.detach().requires_grad_()
        for t in (sample.value, sample.sampling_locations, sample.attention_weights)
    )
    out = ms_deform_attn(value, sample.spatial_shapes, sample.level_start_index, loc, weights)
    grads = torch.autograd.grad(out, (value, loc, weights), grad_output.to(out.dtype))
    return [out.detach(), *grads]


def assert_matches_reference(sample: Sample, *, rtol: float, atol: float) -> None:
    B, Q, nH = sample.sampling_locations.shape[:3]
    C = sample.value.shape[-1]
    grad_output = torch.randn(B, Q, nH * C, dtype=torch.float64, device=sample.value.device)
    grad_output = grad_output.to(sample.value.dtype).double()  # what the op will see
    expected = reference_outputs(sample, grad_output)
    got = op_outputs(sample, grad_output)
    for name, g, e in zip(
        ("output", "grad value", "grad locations", "grad weights"), got, expected
    ):
        assert g.dtype == sample.value.dtype, name
        torch.testing.assert_close(
            g.double(),
            e,
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f"{name} differs from the reference (seed {sample.seed}): {m}",
        )


TOLERANCE = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=6e-2),
    torch.float16: dict(rtol=5e-3, atol=1e-2),
}

# (batch, channels per head, level shapes, points): batch 1 and 3, channels 24 and 48, 1 to 5
# levels (with 1 x N and 1 x 1 maps), 1 to 8 points.
SHAPE_CASES = [
    (1, 24, ((1, 9),), 1),
    (3, 48, ((6, 5), (3, 3), (1, 9)), 8),
    (1, 48, ((7, 6), (4, 3), (2, 2), (1, 5), (1, 1)), 3),
    (3, 24, ((5, 8), (1, 4)), 5),
]


def test_compiled_op_is_built() -> None:
    # `make test` builds model._C first; without it every other test would only check the
    # reference against itself.
    assert ops.has_compiled_op(), f"model._C did not import: {ops._IMPORT_ERROR}"


def _nvcc_present() -> bool:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return bool(shutil.which("nvcc")) or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


@pytest.mark.skipif(not _nvcc_present(), reason="no CUDA toolkit (nvcc): built without CUDA")
@pytest.mark.skipif(
    os.environ.get("PANORAY_CUDA", "").strip() in ("0", "false", "no"),
    reason="PANORAY_CUDA=0 builds the extension without CUDA kernels",
)
def test_cuda_kernels_were_compiled() -> None:
    """With a toolkit here, `make test` built the CUDA kernels too (they compile, not run)."""
    assert ops.has_cuda_kernel()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "panoray::ms_deform_attn_backward", "CUDA"
    )


def test_reference_matches_a_plain_loop() -> None:
    """The oracle itself, against bilinear sampling written out pixel by pixel."""
    s = sample_inputs(batch=1, heads=2, channels=3, shapes=((3, 4), (1, 2)), points=2, queries=3)
    value, loc, weights = s.value, s.sampling_locations, s.attention_weights
    B, Q, nH, L, P, _ = loc.shape
    C = value.shape[-1]
    starts = level_start(s.spatial_shapes.tolist())
    expected = torch.zeros(B, Q, nH, C, dtype=torch.float64)
    for b, q, h, lvl, p in torch.cartesian_prod(*map(torch.arange, (B, Q, nH, L, P))).tolist():
        hh, ww = s.spatial_shapes[lvl].tolist()
        x = loc[b, q, h, lvl, p, 0].item() * ww - 0.5
        y = loc[b, q, h, lvl, p, 1].item() * hh - 0.5
        x0, y0 = int(torch.tensor(x).floor()), int(torch.tensor(y).floor())
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < hh and 0 <= xx < ww:
                corner_weight = (1 - abs(x - xx)) * (1 - abs(y - yy))
                pixel = value[b, starts[lvl] + yy * ww + xx, h]
                expected[b, q, h] += weights[b, q, h, lvl, p] * corner_weight * pixel
    got = ms_deform_attn_reference(value, s.spatial_shapes, loc, weights)
    torch.testing.assert_close(got, expected.flatten(2), msg=f"seed {s.seed}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,channels,shapes,points", SHAPE_CASES)
def test_forward_and_backward_match_reference(dtype, batch, channels, shapes, points) -> None:
    sample = sample_inputs(
        dtype=dtype,
        batch=batch,
        channels=channels,
        shapes=shapes,
        points=points,
        heads=random.randint(1, 3),
        queries=random.randint(1, 12),
    )
    assert_matches_reference(sample, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_borders_pixel_centres_and_outside(dtype) -> None:
    """Locations on 0 and 1, on exact pixel centres (where bilinear has a kink: both sides must
    use grid_sample's convention), on the last coordinates that still touch the map (pixel -1
    and w) and beyond. Power-of-two sizes keep these coordinates exact in floating point."""
    shapes = ((4, 8), (1, 16), (2, 2))
    sample = sample_inputs(dtype=dtype, shapes=shapes, points=8, queries=6, channels=24)
    loc = sample.sampling_locations.detach().clone()
    gen = torch.Generator().manual_seed(sample.seed)
    for level, (h, w) in enumerate(shapes):
        special_x = [0.0, 1.0, 0.5 / w, 1.5 / w, 1 - 0.5 / w, -0.5 / w, 1 + 0.5 / w, -0.7, 1.6]
        special_y = [0.0, 1.0, 0.5 / h, 1 - 0.5 / h, -0.5 / h, 1 + 0.5 / h, 0.5]
        xs = torch.tensor(special_x, dtype=loc.dtype)
        ys = torch.tensor(special_y, dtype=loc.dtype)
        shape = loc[..., level, :, 0].shape
        loc[..., level, :, 0] = xs[torch.randint(len(xs), shape, generator=gen)]
        loc[..., level, :, 1] = ys[torch.randint(len(ys), shape, generator=gen)]
    sample.sampling_locations = loc
    assert_matches_reference(sample, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_on_cpu(dtype) -> None:
    sample = sample_inputs(dtype=dtype, channels=24, points=4)
    assert_matches_reference(sample, **TOLERANCE[dtype])


def assert_gradcheck(device: str, **tolerances) -> None:
    s = sample_inputs(
        device,
        requires_grad=True,
        batch=2,
        heads=2,
        channels=3,
        shapes=((3, 4), (1, 3)),
        queries=3,
        avoid_kinks=True,
    )

    def fn(value, loc, weights):
        return ms_deform_attn(value, s.spatial_shapes, s.level_start_index, loc, weights)

    inputs = (s.value, s.sampling_locations, s.attention_weights)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, **tolerances), f"seed {s.seed}"


def test_gradcheck() -> None:
    assert_gradcheck("cpu", atol=1e-6)


def test_opcheck_forward_and_backward() -> None:
    s = sample_inputs(requires_grad=True, shapes=((3, 4), (1, 3)), queries=4)
    torch.library.opcheck(torch.ops.panoray.ms_deform_attn.default, (*s.args(), 64))
    grad_output = torch.randn(2, 4, 2 * 8, dtype=torch.float64)
    plain = [t.detach() if t.is_floating_point() else t for t in s.args()]
    # Its aot_dispatch check would only repeat the forward's; torch.compile's backward (below)
    # traces it through its fake kernel too.
    torch.library.opcheck(
        torch.ops.panoray.ms_deform_attn_backward.default,
        (grad_output, *plain, 64),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_torch_compile_fullgraph_matches_reference() -> None:
    s = sample_inputs(dtype=torch.float32, requires_grad=True, shapes=((4, 4), (2, 2)))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(value, loc, weights):
        out = ms_deform_attn(value, s.spatial_shapes, s.level_start_index, loc, weights)
        return (out * 2).sum()

    got = layer(s.value, s.sampling_locations, s.attention_weights)
    got_grads = torch.autograd.grad(got, (s.value, s.sampling_locations, s.attention_weights))
    ref = (
        2
        * ms_deform_attn_reference(
            s.value, s.spatial_shapes, s.sampling_locations, s.attention_weights
        ).sum()
    )
    ref_grads = torch.autograd.grad(ref, (s.value, s.sampling_locations, s.attention_weights))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4, msg=f"seed {s.seed}")
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4, msg=f"seed {s.seed}")


def test_non_contiguous_inputs_give_the_contiguous_answer() -> None:
    s = sample_inputs(dtype=torch.float32)
    expected = ms_deform_attn(*s.args())
    # The same values laid out differently in memory.
    value = s.value.transpose(1, 2).contiguous().transpose(1, 2)
    loc = s.sampling_locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights = s.attention_weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value.is_contiguous() or loc.is_contiguous() or weights.is_contiguous())
    got = ms_deform_attn(value, s.spatial_shapes, s.level_start_index, loc, weights)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_mixed_float_dtypes_are_promoted() -> None:
    s = sample_inputs(dtype=torch.float32)
    out = ms_deform_attn(
        s.value.bfloat16(),
        s.spatial_shapes,
        s.level_start_index,
        s.sampling_locations,
        s.attention_weights,
    )
    assert out.dtype == torch.float32
    expected = ms_deform_attn_reference(
        s.value.bfloat16().float(), s.spatial_shapes, s.sampling_locations, s.attention_weights
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_empty_queries() -> None:
    s = sample_inputs(queries=0, requires_grad=True)
    out = ms_deform_attn(*s.args())
    assert out.shape == (2, 0, 2 * 8)
    out.sum().backward()
    assert s.value.grad is not None and not s.value.grad.any()


def _bad(**changes):
    """A sample with some of its tensors replaced (functions of the valid sample)."""

    def make() -> tuple[torch.Tensor, ...]:
        s = sample_inputs(dtype=torch.float32)
        fields = dict(
            zip(
                (
                    "value",
                    "spatial_shapes",
                    "level_start_index",
                    "sampling_locations",
                    "attention_weights",
                ),
                s.args(),
            )
        )
        for name, change in changes.items():
            fields[name] = change(fields[name])
        return tuple(fields.values())

    return make


BAD_INPUTS = {
    "integer value": (TypeError, _bad(value=lambda t: t.long())),
    "float spatial_shapes": (TypeError, _bad(spatial_shapes=lambda t: t.float())),
    "int32 level_start_index": (TypeError, _bad(level_start_index=lambda t: t.int())),
    "value on another device": (ValueError, _bad(value=lambda t: t.to("meta"))),
    "shapes summing to another S": (ValueError, _bad(value=lambda t: t[:, :-1])),
    "levels in another order": (ValueError, _bad(spatial_shapes=lambda t: t.flip(0))),
    "level_start_index off by one": (ValueError, _bad(level_start_index=lambda t: t + 1)),
    "level_start_index of another length": (ValueError, _bad(level_start_index=lambda t: t[:2])),
    "non-positive level": (ValueError, _bad(spatial_shapes=lambda t: t * torch.tensor([1, -1]))),
    "batch mismatch": (ValueError, _bad(sampling_locations=lambda t: t[:1])),
    "heads mismatch": (ValueError, _bad(attention_weights=lambda t: t[:, :, :1])),
    "levels mismatch": (ValueError, _bad(sampling_locations=lambda t: t[:, :, :, :2])),
    "points mismatch": (ValueError, _bad(attention_weights=lambda t: t[..., :2])),
    "value without channel axis": (ValueError, _bad(value=lambda t: t[..., 0])),
    "locations with 3 coordinates": (
        ValueError,
        _bad(sampling_locations=lambda t: torch.cat([t, t[..., :1]], -1)),
    ),
    "list instead of tensor": (TypeError, _bad(spatial_shapes=lambda t: t.tolist())),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(case) -> None:
    error, make = BAD_INPUTS[case]
    with pytest.raises(error, match="ms_deform_attn: .+"):
        ms_deform_attn(*make())


def test_bad_im2col_step_raises() -> None:
    s = sample_inputs()
    with pytest.raises(ValueError, match="im2col_step"):
        ms_deform_attn(*s.args(), 0)


def test_cpu_kernel_checks_levels_even_when_python_does_not() -> None:
    value, shapes, starts, loc, weights = _bad(level_start_index=lambda t: t + 1)()
    with pytest.raises(RuntimeError, match="level_start_index"):
        ms_deform_attn(value, shapes, starts, loc, weights, check_level_values=False)


RAW_OP_BAD_INPUTS = {
    "non-contiguous value": (
        "contiguous",
        _bad(value=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
    ),
    "mixed dtypes": ("share one dtype", _bad(attention_weights=lambda t: t.double())),
    "shapes summing to another S": ("value has S", _bad(value=lambda t: t[:, :-1].contiguous())),
    "level_start_index off by one": ("level_start_index", _bad(level_start_index=lambda t: t + 1)),
    "points mismatch": (
        "attention_weights has shape",
        _bad(attention_weights=lambda t: t[..., :2].contiguous()),
    ),
}


@pytest.mark.parametrize("case", RAW_OP_BAD_INPUTS, ids=list(RAW_OP_BAD_INPUTS))
def test_raw_op_checks_its_inputs(case) -> None:
    """torch.ops.panoray.* called directly (no Python validation) raises, never crashes."""
    match, make = RAW_OP_BAD_INPUTS[case]
    args = make()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.panoray.ms_deform_attn(*args, 64)
    out_shape = (args[0].shape[0], args[3].shape[1], args[0].shape[2] * args[0].shape[3])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.panoray.ms_deform_attn_backward(torch.zeros(out_shape), *args, 64)


def test_missing_extension_falls_back_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(ops, "_HAS_C", False)
    monkeypatch.setattr(ops, "_warned_fallback", False)
    s = sample_inputs()
    with caplog.at_level(logging.WARNING, logger="model.ops"):
        first = ms_deform_attn(*s.args())
        ms_deform_attn(*s.args())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reference" in warnings[0].getMessage()
    expected = ms_deform_attn_reference(
        s.value, s.spatial_shapes, s.sampling_locations, s.attention_weights
    )
    torch.testing.assert_close(first, expected, rtol=0, atol=0)


@requires_cuda_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,channels,shapes,points", SHAPE_CASES)
def test_cuda_matches_reference(dtype, batch, channels, shapes, points) -> None:
    sample = sample_inputs(
        "cuda", dtype=dtype, batch=batch, channels=channels, shapes=shapes, points=points
    )
    assert_matches_reference(sample, **TOLERANCE[dtype])


@requires_cuda_device
def test_cuda_im2col_step_does_not_change_results() -> None:
    s = sample_inputs("cuda", dtype=torch.float64, batch=5)
    full = torch.ops.panoray.ms_deform_attn(*s.args(), 64)
    chunked = torch.ops.panoray.ms_deform_attn(*s.args(), 2)
    torch.testing.assert_close(chunked, full)


@requires_cuda_device
def test_cuda_gradcheck() -> None:
    # grad_value is accumulated with atomics on the GPU: summation order varies between runs.
    assert_gradcheck("cuda", atol=1e-5, nondet_tol=1e-9)
