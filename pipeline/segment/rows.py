"""The row-level steps of the segment job, free of Ray so they can be tested alone.

Rows flow read -> decode -> predict -> encode -> commit. Each input shard also sends one
*end marker* row (``kind == "end"``) carrying the number of images it holds; the driver's
:class:`ShardAssembler` commits a shard once its marker and that many distinct images have
arrived, whatever order the rows come in. Rows are keyed by ``image_id``, so a row delivered
twice (a retried task) is stored once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.segment.decode import decode_batch
from pipeline.segment.schema import OUTPUT_SCHEMA, encode_result
from pipeline.segment.sources import Shard, iter_shard_records

log = logging.getLogger(__name__)

IMAGE, END = "image", "end"
_PASS_THROUGH = ("image_id", "image_uri", "shard", "kind", "end_count")


_niced = False


def yield_cpu(nice: int) -> None:
    """Lower this worker process's CPU priority by `nice`, once per process (0: leave it).

    On a CPU-only node the predictor's threads and the I/O tasks share the cores; every time
    a task preempts one thread of a multi-threaded torch op, the whole op waits. A lower
    priority for the tasks keeps the model's threads running and the tasks in the gaps.
    """
    global _niced
    if nice > 0 and not _niced:
        _niced = True
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
        count += 1
        yield {
            "image_id": record["image_id"],
            "image_uri": record["image_uri"],
            "shard": shard.id,
            "kind": IMAGE,
            "end_count": -1,
            "data": record.get("data") or b"",
            "error": record.get("error"),
        }
    yield {"image_id": f"{shard.id}#end", "image_uri": shard.uri, "shard": shard.id, "kind": END,
           "end_count": count, "data": b"", "error": None}


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


def encode_stage(batch: dict[str, Any], *, model_id: str, nice: int = 0) -> dict[str, Any]:
    """Predictions -> output columns (COCO panoptic PNG + segments_info) plus routing columns."""
    yield_cpu(nice)
    n = len(batch["image_id"])
    now = dt.datetime.now(dt.timezone.utc)
    pngs: list[bytes | None] = []
    infos: list[list | None] = []
    for i in range(n):
        if batch["status"][i] == "ok":
            shape = (int(batch["height"][i]), int(batch["width"][i]))
            id_map = np.frombuffer(batch["panoptic"][i], dtype=np.int32).reshape(shape)
            png, segments = encode_result(id_map, json.loads(batch["segments"][i]))
            pngs.append(png)
            infos.append(segments)
        else:
            pngs.append(None)
            infos.append(None)
    ok = [s == "ok" for s in batch["status"]]
    out = {k: _as_array(batch[k]) for k in _PASS_THROUGH}
    out.update(
        width=_as_array([int(w) if o else None for w, o in zip(batch["width"], ok)]),
        height=_as_array([int(h) if o else None for h, o in zip(batch["height"], ok)]),
        status=_as_array(batch["status"]),
        error=_as_array([None if o else (_message(e) or "failed")
                         for e, o in zip(batch["error"], ok)]),
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


class ShardAssembler:
    """Collects output rows in any order; hands back each shard once it is complete."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, dict]] = {}
        self._expected: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self._rows.keys() | self._expected.keys())

    def add_rows(self, rows: list[dict[str, Any]]) -> list[tuple[str, pa.Table]]:
        """Add rows; returns (shard id, table of its rows) for every shard just completed."""
        touched = set()
        for row in rows:
            shard = row["shard"]
            touched.add(shard)
            if row["kind"] == END:
                self._expected[shard] = int(row["end_count"])
            else:
                self._rows.setdefault(shard, {})[row["image_id"]] = row
        done = []
        for shard in touched:
            expected = self._expected.get(shard)
            rows_in = self._rows.get(shard, {})
            if expected is not None and len(rows_in) >= expected:
                if len(rows_in) > expected:
                    log.warning("shard %s: %d rows for %d images", shard, len(rows_in), expected)
                done.append((shard, to_output_table(list(rows_in.values()))))
                self._rows.pop(shard, None)
                self._expected.pop(shard, None)
        return done


def to_output_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (any extra routing columns are dropped) -> a table with the output schema."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    columns = {name: [r.get(name) for r in rows] for name in OUTPUT_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
