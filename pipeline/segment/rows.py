"""The row-level stages of the segment job, free of Ray so they can be tested alone.

    read_decode_stage (tasks) -> PredictStage (the actor pool: predict, then stage_parts)

Each input shard yields one row per image, numbered by its *ordinal* (0..n-1 in the shard's
own order, the same on every retry), then one *end marker* row (``kind == "end"``) carrying n.
Rows are decoded in the task that reads them (:func:`read_decode_stage`) and flow on to the
predictor actors. A :class:`PredictStage` given an output (``parts=``) encodes its results and
writes each shard's rows of the block as one *part* under an attempt-unique name
(:func:`stage_parts`, ``pipeline.segment.commits``) in the thread of the call, while the
actor's predictor thread goes on with the next block; it hands on only small metadata rows
(shard, part name, ordinals, counts): no image bytes and no id maps travel any further.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import inspect
import json
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.segment.commits import OutputStore
from pipeline.segment.decode import decode_batch
from pipeline.segment.schema import OUTPUT_SCHEMA, encode_result
from pipeline.segment.sources import Shard, iter_shard_records

log = logging.getLogger(__name__)

IMAGE, END = "image", "end"
_PASS_THROUGH = ("image_id", "image_uri", "shard", "kind", "ordinal", "end_count")
PART = "part"  # a metadata row of stage_parts: one part written


_niced = threading.local()


def yield_cpu(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice`, once per thread (0: leave it).

    On a CPU-only node the predictor's threads and the I/O work share the cores; every time
    the I/O preempts one thread of a multi-threaded torch op, the whole op waits. A lower
    priority for the I/O keeps the model's threads running and the I/O in the gaps. (Linux
    keeps a priority per thread: a predictor actor's call threads, which encode and write,
    drop theirs; its predictor thread and the OpenMP threads it starts keep theirs.)
    """
    if nice > 0 and not getattr(_niced, "done", False):
        _niced.done = True
        try:
            os.nice(nice)
        except OSError:  # not permitted here: run at normal priority
            log.debug("could not lower the priority of an I/O worker", exc_info=True)


def read_shard(row: dict[str, Any], *, nice: int = 0) -> Iterator[dict[str, Any]]:
    """One shard (``row["shard"]``) -> one record per image, then its end marker."""
    yield_cpu(nice)
    fields = dict(row["shard"])
    fields["members"] = tuple(fields.get("members") or ())
    shard = Shard(**fields)
    count = 0
    for record in iter_shard_records(shard):
        yield {
            "image_id": record["image_id"],
            "image_uri": record["image_uri"],
            "shard": shard.id,
            "kind": IMAGE,
            "ordinal": count,
            "end_count": -1,
            "data": record.get("data") or b"",
            "error": record.get("error"),
        }
        count += 1
    yield {"image_id": f"{shard.id}#end", "image_uri": shard.uri, "shard": shard.id, "kind": END,
           "ordinal": -1, "end_count": count, "data": b"", "error": None}


def decode_stage(batch: dict[str, Any], *, max_pixels: int, nice: int = 0) -> dict[str, Any]:
    """Decode images to upright RGB uint8 at their original size; end markers pass untouched.

    The predictor does the test-time resize (it owns it, whoever wrote the predictor).
    """
    yield_cpu(nice)
    # An all-null column reaches us as NaN floats: only real messages count as read errors.
    batch = dict(batch)
    batch["error"] = [_message(e) for e in batch["error"]]
    out = decode_batch(batch, max_pixels=max_pixels)
    status = list(out["status"])
    for i, kind in enumerate(batch["kind"]):
        if kind == END:
            status[i] = END
            out["error"][i] = None
    out["status"] = status
    return {k: _as_array(v) for k, v in out.items()}


def read_decode_stage(batch: pa.Table, *, max_pixels: int, nice: int = 0,
                      rows_per_batch: int = 16) -> Iterator[dict[str, Any]]:
    """Shards (a ``shard`` column) -> their rows decoded, `rows_per_batch` at a time.

    :func:`read_shard` then :func:`decode_stage` in one task: a shard's photos are decoded
    where its bytes were read, and only the decoded photos travel on (one task and one
    operator fewer for the driver to schedule). Yielding in batches bounds the task's memory;
    Ray Data packs what it yields into blocks of at most its target block size.
    """
    for shard in batch.column("shard").to_pylist():
        chunk: list[dict[str, Any]] = []
        for row in read_shard({"shard": shard}, nice=nice):
            chunk.append(row)
            if len(chunk) == rows_per_batch:
                yield decode_stage(_columns(chunk), max_pixels=max_pixels, nice=nice)
                chunk = []
        if chunk:
            yield decode_stage(_columns(chunk), max_pixels=max_pixels, nice=nice)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def encode_stage(batch: dict[str, Any], *, model_id: str | None = None,
                 nice: int = 0) -> dict[str, Any]:
    """Predictions -> output columns (COCO panoptic PNG + segments_info) plus routing columns.

    `model_id`: what the rows name as their model; default the batch's `model_id` column (the
    predictor stage's). A result the predictor got wrong (ids it does not describe) becomes an
    error row."""
    yield_cpu(nice)
    n = len(batch["image_id"])
    now = dt.datetime.now(dt.timezone.utc)
    status = list(batch["status"])
    errors = list(batch["error"])
    pngs: list[bytes | None] = [None] * n
    infos: list[list | None] = [None] * n
    for i in range(n):
        if status[i] != "ok":
            continue
        shape = (int(batch["height"][i]), int(batch["width"][i]))
        dtype = batch["panoptic_dtype"][i] if "panoptic_dtype" in batch else "int32"
        id_map = np.frombuffer(batch["panoptic"][i], dtype=dtype).reshape(shape)
        try:
            pngs[i], infos[i] = encode_result(id_map, json.loads(batch["segments"][i]))
        except ValueError as e:  # a predictor's result that is not valid panoptic output
            status[i], errors[i] = "error", f"the predictor's result is invalid: {e}"
    ok = [s == "ok" for s in status]
    if model_id is None:
        model_id = str(batch["model_id"][0]) if n else ""
    out = {k: _as_array(batch[k]) for k in _PASS_THROUGH}
    out.update(
        width=_as_array([int(w) if o else None for w, o in zip(batch["width"], ok)]),
        height=_as_array([int(h) if o else None for h, o in zip(batch["height"], ok)]),
        status=_as_array(status),
        error=_as_array([None if o else (_message(e) or "failed")
                         for e, o in zip(errors, ok)]),
        panoptic_png=_as_array(pngs),
        segments_info=_as_array(infos),
        model_id=_as_array([model_id] * n),
        processed_at=_as_array([now] * n),
    )
    return out


def _message(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _as_array(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


# The default predictor, named rather than imported: the driver of a segment job never imports
# torch (the actors do, when they build it).
DEFAULT_PREDICTOR = "pipeline.segment.predictor:PanopticPredictor"


class PredictorError(ValueError):
    """A predictor class that cannot be used as named."""


def load_predictor(spec: str) -> type:
    """The predictor class named "package.module:Class" (a user's own segmenter).

    Raises PredictorError with one sentence when the name is malformed, the module cannot be
    imported, or the attribute is missing or has no predict method.
    """
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise PredictorError(f"--predictor {spec!r} is not package.module:Class, e.g. "
                         "mypkg.segmenters:MySegmenter")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PredictorError(f"--predictor {spec!r}: cannot import {module_name} ({e}); install it "
                         "or put it on PYTHONPATH, on every node") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not callable(getattr(cls, "predict", None)):
        raise PredictorError(f"--predictor {spec!r}: {module_name} has no class {class_name} with "
                         "a predict(images) method")
    return cls


class PredictStage:
    """The predictor pool's Ray Data callable around any predictor that follows the contract.

    Built once per actor: ``predictor_cls(model_uri, **options)`` (a class, or its
    "package.module:Class" name), with only the options its constructor takes
    (``batch_size``, ``threads``...). Per batch it hands the decoded photos of the rows whose
    status is "ok" to ``predict(images)``, at most `rows_per_call` photos a call, and adds
    columns `panoptic` (the id map at the photo's size, raw bytes in the
    narrowest integer dtype that holds its ids: 1 byte a pixel for the usual few hundred
    segments), `panoptic_dtype`, `segments` (JSON) and `model_id`, and drops `image`. Other
    rows pass through; a call the predictor fails on, or answers wrongly (a count or a map
    size that does not fit), makes error rows of its photos.

    With `parts` (``{"dst": ..., "run_id": ..., "nice": ...}``) the batch's results are then
    encoded and staged as parts (:func:`stage_parts`) and only metadata rows are returned. The
    predictor runs in one thread of its own, so an actor that takes two calls at a time
    (Ray Data's ``max_concurrent_calls_per_actor``) encodes and writes one block while it
    predicts the next.
    """

    def __init__(self, predictor_cls: type | str, model_uri: str, options: dict | None = None, *,
                 parts: dict[str, Any] | None = None, rows_per_call: int = 16):
        if isinstance(predictor_cls, str):
            predictor_cls = load_predictor(predictor_cls)
        # The predictor is built, and always called, in one thread of its own. Ray Data builds
        # a pool's callable in the actor's main thread and calls it from another; torch's
        # OpenMP thread settings are per thread, and a second thread running torch ops beside
        # the first (each with its own team) ran the model at a third of its speed here.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="panoray-predictor")
        self.predictor = self._thread.submit(
            predictor_cls, model_uri, **_accepted(predictor_cls, options or {})).result()
        self.model_id = getattr(self.predictor, "model_id", None) or \
            f"{predictor_cls.__module__}.{predictor_cls.__qualname__}:{model_uri}"
        self.parts = parts
        self.rows_per_call = max(1, rows_per_call)

    def _predict(self, images: list) -> list:
        if self._thread is None:
            return self.predictor.predict(images)
        return self._thread.submit(self.predictor.predict, images).result()

    @classmethod
    def wrapping(cls, predictor: Any, model_id: str | None = None, *,
                 parts: dict[str, Any] | None = None, rows_per_call: int = 16) -> PredictStage:
        """A stage around an already built predictor (tests, notebooks)."""
        stage = cls.__new__(cls)
        stage._thread = None  # called in the caller's thread
        stage.predictor = predictor
        stage.model_id = model_id or getattr(predictor, "model_id", None) or \
            type(predictor).__qualname__
        stage.parts = parts
        stage.rows_per_call = max(1, rows_per_call)
        return stage

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = self.predict_batch(batch)
        if self.parts is None:
            return batch
        # encode_stage lowers this call thread's priority (parts' "nice"): below the model
        return stage_parts(batch, **self.parts)

    def predict_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its predictions (the columns above), `image` dropped."""
        status = list(batch["status"])
        images = batch.pop("image")
        n = len(status)
        todo = [i for i, s in enumerate(status) if s == "ok"]
        panoptic: list[Any] = [None] * n
        dtypes: list[Any] = [None] * n
        segments: list[Any] = [None] * n
        errors = list(batch.get("error", [None] * n))
        for start in range(0, len(todo), self.rows_per_call):
            call = todo[start:start + self.rows_per_call]
            try:
                done = self._predict([images[i] for i in call])
                if len(done) != len(call):
                    raise ValueError(f"predict returned {len(done)} results for {len(call)} "
                                     "images")
            except (RuntimeError, ValueError, TypeError) as e:  # e.g. CUDA OOM on a huge image
                log.exception("the predictor failed on a batch")
                done = []
                for i in call:
                    status[i], errors[i] = "error", f"model failed: {e}"
            for i, (ids, info) in zip(call, done):
                ids = np.asarray(ids)
                if ids.shape != images[i].shape[:2] or not np.issubdtype(ids.dtype, np.integer):
                    status[i], errors[i] = "error", (
                        f"the predictor returned a {ids.dtype} map of shape {ids.shape} for a "
                        f"photo of {images[i].shape[0]} x {images[i].shape[1]}")
                    continue
                narrow = _narrowest(ids)
                panoptic[i] = np.ascontiguousarray(ids, dtype=narrow).tobytes()
                dtypes[i] = np.dtype(narrow).name
                segments[i] = json.dumps(info)
        batch["status"] = _as_array(status)
        batch["error"] = _as_array(errors)
        batch["panoptic"] = _as_array(panoptic)
        batch["panoptic_dtype"] = _as_array(dtypes)
        batch["segments"] = _as_array(segments)
        batch["model_id"] = _as_array([self.model_id] * n)
        return batch


def _accepted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """The options `cls`'s constructor takes (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def _narrowest(ids: np.ndarray) -> type:
    if ids.size == 0:
        return np.uint8
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        return np.int32
    return np.uint8 if high < 2**8 else np.uint16 if high < 2**16 else np.int32


def stage_parts(batch: dict[str, Any], *, dst: str, run_id: str, nice: int = 0,
                max_examples: int = 3) -> dict[str, Any]:
    """Encode a batch of predictions and write each shard's rows in it as one part.

    Returns metadata rows only: per part written (``kind == "part"``) its shard, its path, the
    ordinals it holds and its ok / failed counts with a few failure examples; per end marker
    (``kind == "end"``) its shard and image count.
    """
    out = encode_stage(batch, nice=nice)
    store = _output_store(dst)
    meta: dict[str, list] = {k: [] for k in ("shard", "kind", "part", "ordinals", "end_count",
                                             "ok", "failed", "examples")}

    def add(shard, kind, part=None, ordinals=(), end_count=-1, ok=0, failed=0, examples=()):
        for key, value in (("shard", shard), ("kind", kind), ("part", part),
                           ("ordinals", list(ordinals)), ("end_count", end_count), ("ok", ok),
                           ("failed", failed), ("examples", list(examples))):
            meta[key].append(value)

    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(out["shard"]):
        by_shard.setdefault(shard, []).append(i)
    for shard, rows in by_shard.items():
        images = [i for i in rows if out["kind"][i] == IMAGE]
        if images:
            table = pa.Table.from_pydict(
                {name: [out[name][i] for i in images] for name in OUTPUT_SCHEMA.names},
                schema=OUTPUT_SCHEMA)
            failed = [i for i in images if out["status"][i] != "ok"]
            add(shard, PART, part=store.stage_part(run_id, shard, table),
                ordinals=[int(out["ordinal"][i]) for i in images],
                ok=len(images) - len(failed), failed=len(failed),
                examples=[f"{out['image_uri'][i]}: {out['error'][i]}"
                          for i in failed[:max_examples]])
        for i in rows:
            if out["kind"][i] == END:
                add(shard, END, end_count=int(out["end_count"][i]))
    return {k: _as_array(v) for k, v in meta.items()}


@functools.lru_cache(maxsize=4)
def _output_store(dst: str) -> OutputStore:
    return OutputStore(dst)
