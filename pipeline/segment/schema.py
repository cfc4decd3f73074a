"""The output of ``segment``: one row per input image, as Arrow / Parquet (see DESIGN.md).

Rows are plain dicts built by :func:`ok_row` and :func:`error_row` and turned into tables by
:func:`to_table`, so every writer produces exactly :data:`OUTPUT_SCHEMA`. The types are ones
pyarrow, pandas, polars and DuckDB all read without panoray: ``bbox`` is a fixed-size list of
four int32 (polars ``Array(Int32, 4)``; Parquet itself has no fixed-size list, so readers that
ignore Arrow's stored schema, like DuckDB, see ``INTEGER[]``). Columns marked not null hold a
value in every row; ``width``, ``height``, ``panoptic_png`` and ``segments_info`` are null on
error rows, ``error`` is null on ok rows. Arrow does not enforce nullability when a table is
built, so :func:`validate_rows` checks it along with the panoptic invariants.

``panoptic_png`` is a COCO panoptic PNG (id = R + 256 G + 256^2 B, 0 = void) at the image's
original size; ``segments_info`` describes exactly the non-zero ids in it, with COCO's ``area``
(pixels) and ``bbox`` ([x, y, w, h], tight), plus ``isthing`` and the model's ``score``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.coco.panoptic_io import decode_panoptic_png, encode_panoptic_png, segment_stats

SCHEMA_VERSION = "1"
STATUS_OK = "ok"
STATUS_ERROR = "error"

SEGMENT_INFO = pa.struct([
    pa.field("id", pa.int32()),  # the colour-encoded id in panoptic_png, 1..256^3-1
    pa.field("category_id", pa.int32()),  # the label space's category id (config.json)
    pa.field("isthing", pa.bool_()),
    pa.field("score", pa.float32()),  # the model's confidence, 0..1
    pa.field("area", pa.int64()),  # pixels
    pa.field("bbox", pa.list_(pa.int32(), 4)),  # [x, y, w, h], COCO convention
])

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("panoptic_png", pa.binary()),
        pa.field("segments_info", pa.list_(SEGMENT_INFO)),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={
        "panoray.schema_version": SCHEMA_VERSION,
        "panoray.panoptic_png": "COCO panoptic: id = R + 256 G + 256^2 B, 0 = void",
    },
)


def ok_row(
    *,
    image_id: str,
    image_uri: str,
    shard: str,
    width: int,
    height: int,
    panoptic_png: bytes,
    segments_info: Sequence[Mapping[str, Any]],
    model_id: str,
    processed_at: datetime | None = None,
) -> dict[str, Any]:
    """A row for an image that was segmented (see :func:`encode_result` for the last two)."""
    return {
        "image_id": image_id,
        "image_uri": image_uri,
        "shard": shard,
        "width": int(width),
        "height": int(height),
        "status": STATUS_OK,
        "error": None,
        "panoptic_png": panoptic_png,
        "segments_info": [_segment(s) for s in segments_info],
        "model_id": model_id,
        "processed_at": processed_at or datetime.now(timezone.utc),
    }


def error_row(
    *,
    image_id: str,
    image_uri: str,
    shard: str,
    error: str,
    model_id: str,
    processed_at: datetime | None = None,
) -> dict[str, Any]:
    """A row for an input that could not be segmented; ``error`` says why, for a person."""
    if not error:
        raise ValueError(f"error row for {image_id} needs a message saying what went wrong")
    return {
        "image_id": image_id,
        "image_uri": image_uri,
        "shard": shard,
        "width": None,
        "height": None,
        "status": STATUS_ERROR,
        "error": str(error),
        "panoptic_png": None,
        "segments_info": None,
        "model_id": model_id,
        "processed_at": processed_at or datetime.now(timezone.utc),
    }


def to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows from :func:`ok_row` / :func:`error_row` -> a table with exactly OUTPUT_SCHEMA."""
    return pa.Table.from_pylist(list(rows), schema=OUTPUT_SCHEMA)


def encode_result(
    id_map: np.ndarray, segments_info: Sequence[Mapping[str, Any]]
) -> tuple[bytes, list[dict[str, Any]]]:
    """(H, W) segment ids + their descriptions -> (COCO panoptic PNG bytes, segments_info).

    ``segments_info`` needs ``id``, ``category_id`` and ``isthing`` per segment (``score``
    optional). ``area`` and ``bbox`` are recomputed from ``id_map`` so they agree with the PNG
    whatever resizing came before; segments with no pixel left are dropped. Raises ValueError
    when the map holds an id no segment describes, or two segments share an id.
    """
    id_map = np.asarray(id_map)
    stats = segment_stats(id_map)
    listed = [int(s["id"]) for s in segments_info]
    if len(set(listed)) != len(listed):
        raise ValueError(f"segments_info repeats segment ids ({listed}); give each segment its own")
    missing = sorted(set(stats) - set(listed))
    if missing:
        raise ValueError(
            f"the id map holds segment ids {missing[:10]} that segments_info does not describe; "
            "set those pixels to 0 (void) or describe them"
        )
    segments = []
    for segment in segments_info:
        seg_id = int(segment["id"])
        if seg_id in stats:
            area, bbox = stats[seg_id]
            segments.append(_segment({**segment, "area": area, "bbox": bbox}))
    return encode_panoptic_png(id_map), segments


def validate_rows(table: pa.Table) -> list[str]:
    """Every way ``table`` breaks the output contract, one message each (empty list: valid).

    Checks the schema, unique ``image_id``, required values, error rows' nulls, and for ok rows
    that the PNG has the row's size and exactly the ids in ``segments_info``, whose areas and
    bboxes match the pixels.
    """
    problems = []
    expected = [(f.name, f.type) for f in OUTPUT_SCHEMA]
    if [(f.name, f.type) for f in table.schema] != expected:
        return [f"schema is {table.schema.to_string(show_schema_metadata=False)}, expected "
                f"{OUTPUT_SCHEMA.to_string(show_schema_metadata=False)}"]
    seen: set[str] = set()
    for row in table.to_pylist():
        image_id = row["image_id"]
        if image_id in seen:
            problems.append(f"{image_id}: image_id appears more than once")
        seen.add(image_id)
        problems.extend(f"{image_id}: {p}" for p in _row_problems(row))
    return problems


def _row_problems(row: dict[str, Any]) -> list[str]:
    required = [f.name for f in OUTPUT_SCHEMA if not f.nullable]
    problems = [f"{name} is null" for name in required if row[name] is None]
    if row["status"] == STATUS_ERROR:
        if not row["error"]:
            problems.append("error row without an error message")
        for name in ("width", "height", "panoptic_png", "segments_info"):
            if row[name] is not None:
                problems.append(f"error row has a {name}")
        return problems
    if row["status"] != STATUS_OK:
        return problems + [f"status is {row['status']!r}, expected 'ok' or 'error'"]
    if row["error"] is not None:
        problems.append("ok row has an error message")
    if row["panoptic_png"] is None or row["segments_info"] is None:
        return problems + ["ok row without panoptic_png or segments_info"]
    try:
        id_map = decode_panoptic_png(row["panoptic_png"])
    except Exception as e:  # noqa: BLE001 - report, do not stop at the first bad row
        return problems + [f"panoptic_png does not decode: {e}"]
    if id_map.shape != (row["height"], row["width"]):
        problems.append(f"panoptic_png is {id_map.shape[1]} x {id_map.shape[0]}, the row says "
                        f"{row['width']} x {row['height']}")
    stats = segment_stats(id_map)
    described = {s["id"]: s for s in row["segments_info"]}
    if len(described) != len(row["segments_info"]):
        problems.append("segments_info repeats an id")
    if set(stats) != set(described):
        problems.append(f"ids in panoptic_png {sorted(stats)} != ids in segments_info "
                        f"{sorted(described)}")
    for seg_id in sorted(set(stats) & set(described)):
        area, bbox = stats[seg_id]
        if described[seg_id]["area"] != area or list(described[seg_id]["bbox"]) != bbox:
            problems.append(f"segment {seg_id}: area/bbox {described[seg_id]['area']}/"
                            f"{described[seg_id]['bbox']} != pixels' {area}/{bbox}")
    return problems


def _segment(segment: Mapping[str, Any]) -> dict[str, Any]:
    score = segment.get("score")
    return {
        "id": int(segment["id"]),
        "category_id": int(segment["category_id"]),
        "isthing": bool(segment["isthing"]),
        "score": None if score is None else float(score),
        "area": int(segment["area"]),
        "bbox": [int(v) for v in segment["bbox"]],
    }
