"""A stand-in predictor for benchmarks: a fixed service time per image, a cheap fixed answer.

It follows the predictor contract (``StandIn(model_uri, **options)``; ``predict(images)`` ->
``[(id_map (H, W) int32, segments_info)]``), so ``run_segment(predictor=StandIn)`` runs the
real job around it with no model. ``predict`` sleeps ``service_ms * len(images)`` and answers
a map of three horizontal bands (ids 1, 2, 3) at each photo's size.

The service time comes from the environment variable ``PANORAY_STANDIN_MS`` (set it before Ray
starts: workers inherit the driver's environment) unless ``StandIn.service_ms`` is set.

``OldStandIn`` is the same stand-in for the code before the staged-parts job (commit 82bf6a7,
whose pool runs a ``pipeline.predictor.PanopticPredictor``); it exists only when that tree is
first on the path.
"""

from __future__ import annotations

import os
import time

import numpy as np

ENV = "PANORAY_STANDIN_MS"

_SEGMENTS = [
    {"id": 1, "category_id": 1, "isthing": True, "score": 0.9},
    {"id": 2, "category_id": 2, "isthing": False, "score": 0.8},
    {"id": 3, "category_id": 3, "isthing": True, "score": 0.7},
]


def service_seconds(override: float | None = None) -> float:
    ms = override if override is not None else float(os.environ.get(ENV, "0") or 0)
    return max(ms, 0.0) / 1000.0


class _Answers:
    """One cached id map per photo size: three bands, ids 1..3."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], np.ndarray] = {}

    def get(self, h: int, w: int) -> tuple[np.ndarray, list[dict]]:
        ids = self._maps.get((h, w))
        if ids is None:
            ids = np.empty((h, w), dtype=np.int32)
            edges = [0, h // 3, 2 * h // 3, h]
            for k in range(3):
                ids[edges[k]:edges[k + 1]] = k + 1
            ids.setflags(write=False)
            self._maps[(h, w)] = ids
        return ids, [dict(s) for s in _SEGMENTS]


class StandIn:
    """Sleeps `service_ms` per image; answers three bands at the photo's size."""

    service_ms: float | None = None  # class-level override of PANORAY_STANDIN_MS

    def __init__(self, model_uri: str, **options):  # batch_size, threads...: ignored
        self.delay = service_seconds(self.service_ms)
        self.model_id = f"standin-{self.delay * 1000:g}ms:{model_uri}"
        self._answers = _Answers()

    def predict(self, images) -> list[tuple[np.ndarray, list[dict]]]:
        if self.delay:
            time.sleep(self.delay * len(images))
        return [self._answers.get(int(im.shape[0]), int(im.shape[1])) for im in images]


def _old_standin() -> type:
    from pipeline.predictor import PanopticPredictor  # the tree before (82bf6a7) only

    class OldStandIn(PanopticPredictor):
        """The old pool's class (its __call__ wraps predict) with the stand-in's predict."""

        def __init__(self, bundle: str | None = None, **options):
            self.delay = service_seconds(StandIn.service_ms)
            self.model_id = f"standin-{self.delay * 1000:g}ms:{bundle}"
            self.batch_size = options.get("batch_size", 4)
            self._answers = _Answers()

        def predict(self, images, *, output_sizes=None):
            sizes = list(output_sizes) if output_sizes is not None else \
                [(int(im.shape[0]), int(im.shape[1])) for im in images]
            if self.delay:
                time.sleep(self.delay * len(images))
            return [self._answers.get(int(h), int(w)) for h, w in sizes]

    OldStandIn.__module__ = __name__
    OldStandIn.__qualname__ = "OldStandIn"
    return OldStandIn


def __getattr__(name: str):
    # Built on first use and kept, so pickling by reference finds the same class again.
    if name == "OldStandIn":
        cls = globals()["OldStandIn"] = _old_standin()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
