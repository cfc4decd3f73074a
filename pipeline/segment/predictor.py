"""`PanopticPredictor`: one Mask2Former, loaded once, that segments one batch per call.

It is a plain class (Ray's batch-inference pattern): the segment job runs it in a pool of Ray
actors, and it works just as well without Ray::

    predictor = PanopticPredictor("s3://bucket/models/x")
    results = predictor.predict([image_hwc_uint8, ...], output_sizes=[(H, W), ...])
    id_map, segments_info = results[0]

Images are batched by their padded size (the model pads to a multiple of 32), so an image's
result is the one it gets alone: its batch-mates never change its canvas.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from model.postprocess import postprocess_batch

log = logging.getLogger(__name__)

Size = tuple[int, int]


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _padded(size: Size, div: int) -> Size:
    return (-(-size[0] // div) * div, -(-size[1] // div) * div)


def plan_batches(sizes: Sequence[Size], *, batch_size: int, divisibility: int) -> list[list[int]]:
    """Group image indices into batches of one padded size, at most `batch_size` each.

    The model's position encodings and deformable sampling are relative to the padded canvas,
    so an image padded further than it would be alone gets a (slightly) different answer.
    Batching only images of the same padded size keeps every result equal to the image's
    result alone; at the test-time resize most photos share a handful of padded sizes.
    """
    groups: dict[Size, list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(_padded(size, divisibility), []).append(i)
    return [members[j:j + batch_size] for members in groups.values()
            for j in range(0, len(members), batch_size)]


class PanopticPredictor:
    """Loads a model bundle once; `predict` / `__call__` segment one batch of images.

    Args:
        bundle: a model bundle URI (local or object storage) — or pass `model` instead.
        model: an already built Mask2Former (e.g. fresh from training).
        device: "cuda", "cpu", ...; default CUDA when available.
        batch_size: images per forward pass.
        amp: autocast (bfloat16 where supported, else float16) on CUDA; default on for CUDA.
        threads: torch intra-op threads on the CPU (Ray sets OMP_NUM_THREADS to the actor's CPU
            reservation; a predictor that should use more cores says so here).
    """

    def __init__(self, bundle: str | None = None, *, model: torch.nn.Module | None = None,
                 device: str | None = None, batch_size: int = 4, amp: bool | None = None,
                 threads: int | None = None):
        if (bundle is None) == (model is None):
            raise ValueError("pass exactly one of a bundle URI or a model")
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        if model is None:
            from model.bundle import load_bundle

            model = load_bundle(bundle)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.model_id = getattr(model, "model_id", None) or self.config.name
        self.batch_size = batch_size
        self.amp = (self.device.type == "cuda") if amp is None else amp
        cats = self.config.categories
        self.isthing = [c.isthing for c in cats]
        self.category_ids = [c.id for c in cats]
        log.info("predictor ready: %s on %s (batch %d, amp %s, %d threads)", self.model_id,
                 self.device, batch_size, self.amp, torch.get_num_threads())

    def _autocast(self):
        if not self.amp or self.device.type != "cuda":
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], *,
                output_sizes: Sequence[Size] | None = None) -> list[tuple[np.ndarray, list]]:
        """Segment images (each (H, W, 3) uint8 RGB, already resized to the test size).

        Returns, per image in input order, (id map (H', W') int32 at its output size — the
        original image size, default its own size — and its segments_info list).
        """
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        outs = list(output_sizes) if output_sizes is not None else sizes
        results: list[Any] = [None] * len(images)
        div = self.config.size_divisibility
        for batch in plan_batches(sizes, batch_size=self.batch_size, divisibility=div):
            padded = _padded((max(sizes[i][0] for i in batch), max(sizes[i][1] for i in batch)),
                             div)
            canvas = np.zeros((len(batch), 3, *padded), dtype=np.float32)
            for row, i in enumerate(batch):
                h, w = sizes[i]
                canvas[row, :, :h, :w] = images[i].transpose(2, 0, 1)  # read-only input is fine
            x = torch.from_numpy(canvas)
            # Pad-value pixels are masked out below by cropping; the model normalises first
            # and pads with zeros itself, so mark our padding as the mean colour (-> 0).
            x = self._fill_padding(x, [sizes[i] for i in batch])
            with self._autocast():
                out = self.model(x.to(self.device, non_blocking=True), aux_outputs=False)
            done = postprocess_batch(
                pred_logits=out["pred_logits"].float(), pred_masks=out["pred_masks"].float(),
                input_sizes=[sizes[i] for i in batch], output_sizes=[outs[i] for i in batch],
                padded_size=padded, isthing=self.isthing, category_ids=self.category_ids,
                object_mask_threshold=self.config.inference.object_mask_threshold,
                overlap_threshold=self.config.inference.overlap_threshold)
            for i, result in zip(batch, done):
                seg, info = result["panoptic_seg"]
                results[i] = (seg.cpu().numpy().astype(np.int32), info)
        return results

    def _fill_padding(self, x: torch.Tensor, sizes: Sequence[Size]) -> torch.Tensor:
        mean = torch.tensor(self.config.pixel_mean, dtype=x.dtype).view(3, 1, 1)
        for row, (h, w) in enumerate(sizes):
            x[row, :, h:, :] = mean
            x[row, :, :h, w:] = mean
        return x

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data batch in, batch out: rows with status "ok" and an `image` get segmented.

        Reads columns image (H, W, 3) uint8, height, width (original size), status; adds
        `panoptic` (the id map at the original size as raw int32 bytes, row-major (height,
        width)) and `segments` (segments_info as JSON), and drops `image`. Bytes and strings
        keep the columns one Arrow type whatever mix of rows a batch holds. Rows that are not
        "ok" pass through with empty results; a failure of the model on a batch turns its rows
        into error rows instead of failing the job.
        """
        status = list(batch["status"])
        images = batch.pop("image")
        todo = [i for i, s in enumerate(status) if s == "ok"]
        panoptic: list[Any] = [None] * len(status)
        segments: list[Any] = [None] * len(status)
        errors = list(batch.get("error", [None] * len(status)))
        if todo:
            sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in todo]
            try:
                done = self.predict([images[i] for i in todo], output_sizes=sizes)
            except (RuntimeError, ValueError) as e:  # e.g. CUDA OOM on a huge image
                log.exception("model failed on a batch")
                done = None
                for i in todo:
                    status[i], errors[i] = "error", f"model failed: {e}"
            for i, (ids, info) in zip(todo, done or []):
                panoptic[i] = np.ascontiguousarray(ids, dtype=np.int32).tobytes()
                segments[i] = json.dumps(info)
        batch["status"] = np.array(status, dtype=object)
        batch["error"] = np.array(errors, dtype=object)
        batch["panoptic"] = _object_array(panoptic)
        batch["segments"] = _object_array(segments)
        return batch


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def default_threads() -> int:
    """Torch threads for a CPU predictor: every core Ray would not otherwise use."""
    return max(1, os.cpu_count() or 1)

