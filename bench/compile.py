"""Benchmark: what `torch.compile` buys the CPU inference forward, vs eager.

For each preset and size: build the model (seeded random weights, eval), run the eager
inference forward `net(images, aux_outputs=False)` (what `PanopticPredictor` runs) under
`torch.inference_mode()`, compile it with `torch.compile(net, fullgraph=True)` (inductor; with
`--freezing` also inductor's weight freezing, its CPU inference setting), time the first
compiled call (the compile), check that the outputs agree with eager's, then time `--repeats`
eager and compiled forwards interleaved (so that load on a shared machine hits both alike) and
print side by side the medians, the median of the pairs' ratios (eager / compiled of
back-to-back runs: what a load that drifts slowly cancels out of) and the fastest of each
(other load only ever adds time). float32, batch `--batch`, torch's default thread count
unless `--threads`.

Run: ``python bench/compile.py [--cases tiny:512 r50-coco-panoptic:384] [--repeats 7]
[--freezing] [--threads T]``. The first compile of a shape takes minutes on 2 cores (inductor
generates and compiles C++); a rerun reuses inductor's cache in /tmp/torchinductor_$USER, so
``--fresh`` points it at an empty folder to measure a cold compile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from model.mask2former import build_model
from model.ops import has_compiled_op


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(preset: str, size: int, *, batch: int, repeats: int, freezing: bool) -> dict:
    torch.manual_seed(0)
    net = build_model(preset)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 255
    torch._dynamo.reset()
    torch._inductor.config.freezing = freezing
    compiled = torch.compile(net, fullgraph=True)
    with torch.inference_mode():
        expected = net(images, aux_outputs=False)  # also the eager warm-up
        compile_s = timed(lambda: compiled(images, aux_outputs=False))
        out = compiled(images, aux_outputs=False)
        # Largest difference relative to the output's largest magnitude.
        diff = max(((out[k] - expected[k]).abs().max() / expected[k].abs().max()).item()
                   for k in ("pred_logits", "pred_masks"))
        eager, fast = [], []
        for _ in range(repeats):
            eager.append(timed(lambda: net(images, aux_outputs=False)))
            fast.append(timed(lambda: compiled(images, aux_outputs=False)))
    return {"preset": preset, "size": size, "eager": statistics.median(eager),
            "compiled": statistics.median(fast), "eager_range": (min(eager), max(eager)),
            "compiled_range": (min(fast), max(fast)), "compile_s": compile_s, "diff": diff,
            "pair_ratio": statistics.median(e / c for e, c in zip(eager, fast))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["tiny:512", "r50-coco-panoptic:384"],
                        help="preset:size pairs (square inputs)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--freezing", action="store_true",
                        help="inductor's weight freezing (constant-folds the weights)")
    parser.add_argument("--fresh", action="store_true",
                        help="an empty inductor cache: measure a cold compile")
    args = parser.parse_args()
    if not has_compiled_op():
        raise SystemExit("model._C is not built (make setup): the op would fall back")
    if args.fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.repeats}, inductor{' + freezing' if args.freezing else ''}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    for case in args.cases:
        preset, size = case.rsplit(":", 1)
        row = bench_case(preset, int(size), batch=args.batch, repeats=args.repeats,
                         freezing=args.freezing)
        rows.append(row)
        print(f"  {preset} {size}px: eager {row['eager'] * 1e3:.0f} ms "
              f"({row['eager_range'][0] * 1e3:.0f}-{row['eager_range'][1] * 1e3:.0f}), "
              f"compiled {row['compiled'] * 1e3:.0f} ms "
              f"({row['compiled_range'][0] * 1e3:.0f}-{row['compiled_range'][1] * 1e3:.0f}), "
              f"first compiled call {row['compile_s']:.0f} s, max |diff| / max |out| "
              f"{row['diff']:.1e}",
              flush=True)
    print()
    print("| preset | input | eager ms | compiled ms | eager / compiled | median of pair "
          "ratios | fastest: eager / compiled ms | first call s | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        (e_best, _), (c_best, _) = r["eager_range"], r["compiled_range"]
        print(f"| {r['preset']} | {r['size']}² | {r['eager'] * 1e3:.0f} | "
              f"{r['compiled'] * 1e3:.0f} | **{r['eager'] / r['compiled']:.2f}x** | "
              f"{r['pair_ratio']:.2f}x | {e_best * 1e3:.0f} / {c_best * 1e3:.0f} "
              f"({e_best / c_best:.2f}x) | {r['compile_s']:.0f} | {r['diff']:.1e} |")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
