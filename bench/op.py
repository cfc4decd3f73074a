"""Benchmark of the multi-scale deformable attention op on CPU.

Mask2Former's pixel-decoder encoder shapes: batch 1, 8 heads x 32 channels, 3 levels, 4 points,
every token a query; inputs of 512 x 512 (levels 64^2, 32^2, 16^2) and 1024 x 1024
(128^2, 64^2, 32^2). Compares, in float32 with all threads of the machine, the median forward
and forward + backward times of panoray's CPU kernel, the grid_sample reference and the
``torch-ms-deform-attn`` package (``make bench`` installs it; benchmark-only), after checking
that all three give the same outputs and gradients.

Run: ``python bench/op.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from model.ops import has_compiled_op, ms_deform_attn, ms_deform_attn_reference

HEADS, CHANNELS, POINTS = 8, 32, 4
INPUT_SIZES = (512, 1024)

Op = Callable[..., torch.Tensor]


def encoder_inputs(image_size: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of one encoder layer for an image_size^2 image: strides 8, 16 and 32."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[image_size // s, image_size // s] for s in (8, 16, 32)])
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(1, S, HEADS, CHANNELS, generator=gen)
    locations = _sampling_locations(shapes, gen)
    weights = torch.rand(1, S, HEADS, L * POINTS, generator=gen).softmax(-1)
    weights = weights.view(1, S, HEADS, L, POINTS)
    return {
        "value": value,
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": locations,
        "attention_weights": weights,
    }


def _sampling_locations(shapes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(1, S, nH, L, P, 2) locations as Mask2Former's encoder makes them.

    Each query's reference point is its own pixel centre (normalised), shared by all levels; the
    offsets follow the layer's initialisation (head h looks in direction 2 pi h / nH, point p at
    p + 1 pixels) plus a pixel of noise, divided by each level's (w, h).
    """
    refs = []
    for h, w in shapes.tolist():
        ys, xs = torch.meshgrid(
            (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
        )
        refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    ref = torch.cat(refs)  # (S, 2)
    theta = torch.arange(HEADS) * (2 * torch.pi / HEADS)
    direction = torch.stack([theta.cos(), theta.sin()], -1)
    direction = direction / direction.abs().max(-1, keepdim=True).values  # (nH, 2)
    steps = torch.arange(1, POINTS + 1, dtype=torch.float32)
    offsets = direction[:, None, None, :] * steps[None, None, :, None]  # (nH, 1, P, 2)
    noise = torch.randn(ref.shape[0], HEADS, len(shapes), POINTS, 2, generator=gen)
    normaliser = shapes.flip(-1).float()[None, None, :, None, :]  # (w, h) per level
    return (ref[:, None, None, None, :] + (offsets + noise) / normaliser)[None]


def ops() -> dict[str, Op]:
    """name -> fn(value, shapes, starts, locations, weights); the peer when it is installed."""
    table: dict[str, Op] = {
        "panoray": lambda v, s, i, loc, w: ms_deform_attn(v, s, i, loc, w),
        "reference": lambda v, s, i, loc, w: ms_deform_attn_reference(v, s, loc, w),
    }
    try:
        import torch_ms_deform_attn
    except ImportError:
        print("torch-ms-deform-attn is not installed; `make bench` installs it.", file=sys.stderr)
    else:
        table["peer"] = lambda v, s, i, loc, w: torch_ms_deform_attn.ms_deform_attn(
            v, s, i, loc, w, 64
        )
    return table


def run_once(op: Op, inputs: dict[str, torch.Tensor], *, backward: bool) -> list[torch.Tensor]:
    """The output, then (when backward) the gradients of value, locations and weights."""
    grads = ("value", "sampling_locations", "attention_weights")
    args = {
        k: (t.detach().requires_grad_(k in grads) if backward else t) for k, t in inputs.items()
    }
    out = op(*args.values())
    if not backward:
        return [out]
    out.backward(_grad_output(out))
    return [out] + [args[k].grad for k in grads]


def _grad_output(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)


def check_agreement(table: dict[str, Op], inputs: dict[str, torch.Tensor]) -> None:
    """Raise if any op's output or gradients differ from the float64 reference."""
    as64 = {k: (t.double() if t.is_floating_point() else t) for k, t in inputs.items()}
    expected = run_once(table["reference"], as64, backward=True)
    for name, op in table.items():
        got = run_once(op, inputs, backward=True)
        for what, g, e in zip(("output", "grad value", "grad loc", "grad weights"), got, expected):
            scale = e.abs().max().item()
            err = (g.double() - e).abs().max().item()
            if err > 1e-4 * max(scale, 1.0):
                raise SystemExit(f"{name}: {what} differs from the reference by {err:.3g}")


def median_seconds(fns: dict[str, Callable[[], object]], *, repeats: int) -> dict[str, float]:
    """Median wall time of each function. The functions take turns, round after round, so that
    load from other processes on the machine falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per cell (median)")
    args = parser.parse_args()
    if not has_compiled_op():
        raise SystemExit("model._C is not built; run `make setup` first.")
    table = ops()
    print(
        f"ms_deform_attn on CPU, float32, {torch.get_num_threads()} threads; batch 1, "
        f"{HEADS} heads x {CHANNELS} channels, 3 levels, {POINTS} points; median of "
        f"{args.repeats} (ms); ratios above 1: panoray is faster"
    )
    names = list(table)
    header = f"{'input':>9} {'pass':>8} " + " ".join(f"{n:>10}" for n in names)
    header += f" {'ref/ours':>9}" + (f" {'peer/ours':>9}" if "peer" in table else "")
    print(header)
    for size in INPUT_SIZES:
        inputs = encoder_inputs(size)
        check_agreement(table, inputs)
        for backward in (False, True):
            times = median_seconds(
                {
                    name: lambda op=op, inputs=inputs, backward=backward: run_once(
                        op, inputs, backward=backward
                    )
                    for name, op in table.items()
                },
                repeats=args.repeats,
            )
            ours = times["panoray"]
            line = f"{size:>4}x{size:<4} {'fwd+bwd' if backward else 'fwd':>8} "
            line += " ".join(f"{times[n] * 1e3:>10.1f}" for n in names)
            line += f" {times['reference'] / ours:>8.1f}x"
            if "peer" in table:
                line += f" {times['peer'] / ours:>8.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
