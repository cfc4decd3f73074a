"""`PanopticPredictor`: one Mask2Former, loaded once, that segments one batch per call.

It is a plain class (Ray's batch-inference pattern): the segment job runs it in a pool of Ray
actors, and it works just as well without Ray::

    predictor = PanopticPredictor("s3://bucket/models/x")
    results = predictor.predict([photo_hwc_uint8, ...])     # photos of any size
    id_map, segments_info = results[0]                       # id_map at the photo's size

The predictor owns the test-time resize (the bundle's `inference.min_size` / `max_size`), so a
photo gets the same answer here, in the segment job and in evaluation during training. On the
CPU it is :func:`pipeline.segment.decode.resize_image` (Pillow's bilinear, which measured
faster there); on a GPU the original uint8 photo goes to the device (pinned memory, a side
stream) and is resized there by :func:`resize_on_device` (the same antialiased bilinear filter,
rounded to uint8 as Pillow does; pixels within one level of Pillow's), so the host only lays
bytes out. Resized images are batched by their padded size (the model pads to a multiple of
32), so an image's result is the one it gets alone: its batch-mates never change its canvas
(batched matrix products may still round differently, which flipped one pixel in ~250,000 on
the COCO sample).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from model.postprocess import postprocess_batch
from pipeline.segment.decode import resize_image, resized_size

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
    """Loads a model bundle once; `predict` segments a list of photos.

    It follows the predictor contract every segment predictor follows (see DESIGN.md):
    `cls(model_uri, **options)` builds it once per actor; `predict(images)` takes (H, W, 3)
    uint8 RGB photos of any size and returns, per photo, (id_map (H, W) int32, segments_info).
    The segment job wraps it (or a user's class) in `pipeline.segment.rows.PredictStage`.

    Args:
        bundle: a model bundle URI (local or object storage) — or pass `model` instead.
        model: an already built Mask2Former (e.g. fresh from training).
        device: "cuda", "cpu", ...; default CUDA when available.
        batch_size: images per forward pass.
        amp: autocast (bfloat16 where supported, else float16) on CUDA; default on for CUDA.
        threads: torch intra-op threads on the CPU (Ray sets OMP_NUM_THREADS to the actor's CPU
            reservation; a predictor that should use more cores says so here). The setting
            holds in the thread that builds the predictor (OpenMP's are per thread): call
            `predict` from that thread (the segment job does).
        device_resize: resize on the device (:func:`resize_on_device`) rather than on the host
            with Pillow; default on for CUDA, off on the CPU.
        compile: `torch.compile` the inference forward (the model traces whole: one graph per
            canvas size), or the name of a torch.compile backend ("inductor" when True).
    """

    def __init__(self, bundle: str | None = None, *, model: torch.nn.Module | None = None,
                 device: str | None = None, batch_size: int = 4, amp: bool | None = None,
                 threads: int | None = None, device_resize: bool | None = None,
                 compile: bool | str = False):
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
        self.device_resize = (self.device.type == "cuda") if device_resize is None \
            else device_resize
        self.forward = self.model
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self.forward = torch.compile(self.model, backend=backend, fullgraph=True)
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
    def predict(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, list]]:
        """Segment photos: each (H, W, 3) uint8 RGB, of any size.

        Each photo is resized to the model's test size (`inference.min_size` / `max_size`: on
        the host with :func:`pipeline.segment.decode.resize_image`, or on the device with
        :func:`resize_on_device`), segmented, and its id map brought back to the photo's size.
        Returns, per photo in input order, (id map (H, W) int32, segments_info: a list of {id,
        category_id, isthing, score}, one per segment id in the map).
        """
        inference = self.config.inference
        originals = [_photo_size(i, im) for i, im in enumerate(images)]
        sizes = []
        for h, w in originals:
            tw, th = resized_size(width=w, height=h, short_side=inference.min_size,
                                  max_long_side=inference.max_size)
            sizes.append((th, tw))
        if self.device_resize:
            pixels = list(images)  # the originals travel; the device resizes them
        else:
            pixels = [resize_image(im, short_side=inference.min_size,
                                   max_long_side=inference.max_size) for im in images]
        results: list[Any] = [None] * len(images)
        div = self.config.size_divisibility
        batches = plan_batches(sizes, batch_size=self.batch_size, divisibility=div)
        paddings = [_padded((max(sizes[i][0] for i in b), max(sizes[i][1] for i in b)), div)
                    for b in batches]
        staged = self._staged_canvases([[pixels[i] for i in b] for b in batches],
                                       [[sizes[i] for i in b] for b in batches], paddings)
        for batch, padded, x in zip(batches, paddings, staged):
            with self._autocast():
                out = self.forward(x, aux_outputs=False)
            done = postprocess_batch(
                pred_logits=out["pred_logits"].float(), pred_masks=out["pred_masks"].float(),
                input_sizes=[sizes[i] for i in batch],
                output_sizes=[originals[i] for i in batch],
                padded_size=padded, isthing=self.isthing, category_ids=self.category_ids,
                object_mask_threshold=inference.object_mask_threshold,
                overlap_threshold=inference.overlap_threshold)
            # The id maps leave the device once per batch, in one stream of copies.
            maps = [result["panoptic_seg"][0].to("cpu", non_blocking=True) for result in done]
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            for i, result, seg in zip(batch, done, maps):
                results[i] = (seg.numpy().astype(np.int32), result["panoptic_seg"][1])
        return results

    def _staged_canvases(self, groups: list[list[np.ndarray]], targets: list[list[Size]],
                         paddings: list[Size]):
        """The batches' canvases on the device, one at a time (a generator).

        On a GPU the uint8 pixels of batch k + 1 are laid out in one pinned host buffer and
        copied on a side stream while batch k computes; the compute stream waits for that copy
        only when it needs the batch. On other devices each canvas is built when it is needed."""
        if self.device.type != "cuda":
            for images, sizes, padded in zip(groups, targets, paddings):
                pixels = [torch.from_numpy(np.require(im, requirements=["C", "W"]))
                          for im in images]
                yield self._canvas([p.to(self.device) for p in pixels], sizes, padded)
            return
        copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        def stage(images):
            shapes = [tuple(int(d) for d in im.shape) for im in images]
            host = torch.empty(sum(int(np.prod(s)) for s in shapes), dtype=torch.uint8)
            host = host.pin_memory()
            views, at = [], 0
            for image, shape in zip(images, shapes):
                n = int(np.prod(shape))
                host[at:at + n].view(shape).copy_(torch.from_numpy(
                    np.require(image, requirements=["C"])))
                views.append((at, n, shape))
                at += n
            with torch.cuda.stream(copy_stream):
                flat = host.to(self.device, non_blocking=True)
            return host, flat, views

        pending = stage(groups[0]) if groups else None
        for k, (sizes, padded) in enumerate(zip(targets, paddings)):
            host, flat, views = pending
            pending = stage(groups[k + 1]) if k + 1 < len(groups) else None
            compute.wait_stream(copy_stream)
            flat.record_stream(compute)
            pixels = [flat[at:at + n].view(shape) for at, n, shape in views]
            yield self._canvas(pixels, sizes, padded)
            del host  # its copy is done once the compute stream has passed the wait

    def _canvas(self, pixels: Sequence[torch.Tensor], sizes: Sequence[Size],
                padded: Size) -> torch.Tensor:
        """(B, 3, *padded) float32 on the device: each (h, w, 3) uint8 photo (on the device)
        at its test size top-left (resized there by :func:`resize_on_device` when it is not at
        that size yet), the rest the mean colour.

        The model normalises first and pads with zeros itself, so our padding is the mean colour
        (-> 0); its pixels are cropped away after the forward.
        """
        mean = torch.tensor(self.config.pixel_mean, dtype=torch.float32, device=self.device)
        x = mean.view(1, 3, 1, 1).repeat(len(pixels), 1, *padded)
        for row, (p, (h, w)) in enumerate(zip(pixels, sizes)):
            x[row, :, :h, :w] = resize_on_device(p, (h, w))
        return x


def resize_on_device(pixels: torch.Tensor, size: Size) -> torch.Tensor:
    """(3, h, w) float32 of an (H, W, 3) uint8 photo at `size` = (h, w), on its device.

    Bilinear with half-pixel centres, antialiased when shrinking (the filter Pillow's BILINEAR
    resize uses), rounded to whole levels as Pillow's uint8 result is; within one level of
    :func:`pipeline.segment.decode.resize_image`. A photo already at `size` is only converted.
    """
    x = pixels.permute(2, 0, 1).float()
    if tuple(x.shape[1:]) == tuple(size):
        return x
    x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear",
                                        align_corners=False, antialias=True)[0]
    return x.round_().clamp_(0, 255)


def _photo_size(index: int, image: np.ndarray) -> Size:
    """(H, W) of a photo, which must be an (H, W, 3) uint8 RGB array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or 0 in image.shape:
        described = (f"a {image.dtype} array of shape {image.shape}"
                     if isinstance(image, np.ndarray) else f"a {type(image).__name__}")
        raise ValueError(f"image {index} is {described}; pass (H, W, 3) uint8 RGB arrays, e.g. "
                         "np.asarray(PIL.Image.open(path).convert('RGB'))")
    return int(image.shape[0]), int(image.shape[1])


def default_threads() -> int:
    """Torch threads for a CPU predictor: every core Ray would not otherwise use."""
    return max(1, os.cpu_count() or 1)

