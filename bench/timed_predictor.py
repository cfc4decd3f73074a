"""`PanopticPredictor` that notes when each `predict` call starts and ends (for benchmarks).

Importable by Ray workers as ``bench.timed_predictor:TimedPredictor`` with the repository root
on PYTHONPATH. Each call appends ``start end images cpu threads pid`` (wall-clock seconds,
``time.time()``, so comparable across processes on one machine; the process's CPU seconds
during the call; torch's thread count in the calling thread; the process id) to the file named
by ``PANORAY_BENCH_TIMES``.
"""

from __future__ import annotations

import os
import time

import torch

from pipeline.segment.predictor import PanopticPredictor

ENV = "PANORAY_BENCH_TIMES"


class TimedPredictor(PanopticPredictor):
    def predict(self, images):
        start, cpu = time.time(), time.process_time()
        results = super().predict(images)
        with open(os.environ[ENV], "a") as f:
            f.write(f"{start:.6f} {time.time():.6f} {len(images)} "
                    f"{time.process_time() - cpu:.3f} {torch.get_num_threads()} {os.getpid()}\n")
        return results


def read_times(path: str) -> list[tuple[float, float, int, float, int, int]]:
    """The (start, end, images, cpu seconds, threads, pid) of every call, in start order."""
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    return sorted((float(a), float(b), int(n), float(c), int(t), int(p))
                  for a, b, n, c, t, p in rows)
