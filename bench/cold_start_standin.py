"""A stand-in predictor for benchmarks of the job around the model (no torch, no weights).

Follows the predictor contract (DESIGN.md): built once per actor as ``StandIn(model_uri,
**options)``; ``predict(images)`` answers every photo with an empty panoptic map of its size.
Importable by Ray workers as ``bench.cold_start_standin`` with the repository root on
PYTHONPATH.
"""

from __future__ import annotations

import numpy as np


class StandIn:
    model_id = "standin"

    def __init__(self, model_uri: str, **options):
        self.model_uri = model_uri

    def predict(self, images):
        return [(np.zeros(image.shape[:2], np.int32), []) for image in images]
