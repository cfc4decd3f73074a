"""A user's own predictor, as `panoray segment --predictor standin_predictor:Halves` loads it:
no panoray base class, only the contract (built as Cls(model_uri, **options), predict(images))."""

from __future__ import annotations

import numpy as np


class Halves:
    """Left half segment 1 ("sky", stuff), right half segment 2 (a "car", a thing)."""

    model_id = "halves@v1"

    def __init__(self, model_uri: str, batch_size: int = 1):
        self.model_uri = model_uri
        self.batch_size = batch_size  # an option it takes; others (threads) are not passed

    def predict(self, images):
        out = []
        for image in images:
            h, w = image.shape[:2]
            ids = np.ones((h, w), np.int32)
            ids[:, w // 2:] = 2
            out.append((ids, [{"id": 1, "category_id": 7, "isthing": False, "score": 1.0},
                              {"id": 2, "category_id": 3, "isthing": True, "score": 0.5}]))
        return out


class Tally:
    """Notes which process answered each call, in files under the folder it is given as its
    model; the first actor built starts at once, any other one a second later (the way one
    of several actors loading a model is ready first)."""

    def __init__(self, model_uri: str):
        import os
        import time

        self.folder = model_uri
        try:
            with open(os.path.join(model_uri, "first"), "x"):
                pass
        except FileExistsError:
            time.sleep(1.0)

    def predict(self, images):
        import os
        import time

        time.sleep(2.0)  # one call at a time per actor: its predictor thread
        with open(os.path.join(self.folder, f"calls-{os.getpid()}"), "a") as f:
            f.write(f"{len(images)}\n")
        return Halves("").predict(images)
