"""The output schema: Parquet round trips through four readers, panoptic PNG ids, row invariants."""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.coco.panoptic_io import decode_panoptic_png
from pipeline.segment.schema import (
    OUTPUT_SCHEMA,
    encode_result,
    error_row,
    ok_row,
    to_table,
    validate_rows,
)

WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
BIG_ID = 3 * 256**2 + 2 * 256 + 7  # uses all three colour channels


def _id_map() -> tuple[np.ndarray, list[dict]]:
    """5 x 6: a thing (id 1) in a 3 x 2 box at x=1, y=2; stuff (BIG_ID) in the rest but row 0."""
    id_map = np.full((5, 6), BIG_ID, dtype=np.int64)
    id_map[0] = 0
    id_map[2:4, 1:4] = 1
    segments = [
        {"id": 1, "category_id": 17, "isthing": True, "score": 0.9},
        {"id": BIG_ID, "category_id": 184, "isthing": False, "score": 0.75},
        {"id": 99, "category_id": 3, "isthing": True, "score": 0.5},  # no pixels: dropped
    ]
    return id_map, segments


def _rows() -> list[dict]:
    png, segments = encode_result(*_id_map())
    return [
        ok_row(image_id="s/a", image_uri="s3://b/s.tar#a.jpg", shard="s", width=6, height=5,
               panoptic_png=png, segments_info=segments, model_id="m@1", processed_at=WHEN),
        error_row(image_id="s/b", image_uri="s3://b/s.tar#b.jpg", shard="s",
                  error="truncated JPEG: image file is truncated", model_id="m@1",
                  processed_at=WHEN),
    ]


def test_encode_result_recomputes_area_and_bbox_and_drops_empty_segments():
    id_map, segments = _id_map()
    png, out = encode_result(id_map, segments)
    assert decode_panoptic_png(png).tolist() == id_map.tolist()
    by_id = {s["id"]: s for s in out}
    assert sorted(by_id) == [1, BIG_ID]
    assert (by_id[1]["area"], by_id[1]["bbox"]) == (6, [1, 2, 3, 2])
    assert (by_id[BIG_ID]["area"], by_id[BIG_ID]["bbox"]) == (30 - 6 - 6, [0, 1, 6, 4])
    assert by_id[BIG_ID]["category_id"] == 184 and by_id[BIG_ID]["isthing"] is False


def test_encode_result_rejects_undescribed_or_repeated_ids():
    id_map, segments = _id_map()
    with pytest.raises(ValueError, match=rf"ids \[{BIG_ID}\] that segments_info does not"):
        encode_result(id_map, segments[:1])
    with pytest.raises(ValueError, match="repeats segment ids"):
        encode_result(id_map, segments + segments[:1])


def test_parquet_round_trip_through_pyarrow_pandas_polars_and_duckdb(tmp_path):
    path = tmp_path / "out.parquet"
    table = to_table(_rows())
    pq.write_table(table, path)

    back = pq.read_table(path)
    assert back.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    assert back.to_pylist() == table.to_pylist()
    assert validate_rows(back) == []

    df = pd.read_parquet(path)
    assert str(df["processed_at"].dt.tz) == "UTC"
    assert df["width"].isna().tolist() == [False, True]
    assert df["panoptic_png"].iloc[0] == table["panoptic_png"][0].as_py()
    assert list(df["segments_info"].iloc[0][0]["bbox"]) == [1, 2, 3, 2]

    frame = pl.read_parquet(path)
    assert frame.schema["width"] == pl.Int32
    assert frame.schema["panoptic_png"] == pl.Binary
    assert frame.schema["processed_at"] == pl.Datetime("us", "UTC")
    assert frame.schema["segments_info"].inner.to_schema()["bbox"] == pl.Array(pl.Int32, 4)
    assert frame["height"].to_list() == [5, None]

    con = duckdb.connect()
    described = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()
    types = {row[0]: row[1] for row in described}
    assert types["width"] == "INTEGER" and types["panoptic_png"] == "BLOB"
    assert types["processed_at"] == "TIMESTAMP WITH TIME ZONE"
    # Parquet has no fixed-size list: readers that ignore Arrow's stored schema see a plain list.
    assert "area BIGINT, bbox INTEGER[])[]" in types["segments_info"]
    total_area, things = con.execute(
        f"SELECT sum(s.area), count(*) FILTER (WHERE s.isthing) "
        f"FROM (SELECT unnest(segments_info) AS s FROM read_parquet('{path}'))"
    ).fetchone()
    assert (total_area, things) == (24, 1)  # 30 pixels minus the 6 void ones in row 0


def test_error_rows_have_null_size_png_and_segments():
    table = to_table(_rows())
    error = table.filter(pa.compute.equal(table["status"], "error")).to_pylist()[0]
    assert [error[k] for k in ("width", "height", "panoptic_png", "segments_info")] == [None] * 4
    assert error["error"].startswith("truncated JPEG")
    with pytest.raises(ValueError, match="needs a message"):
        error_row(image_id="x", image_uri="x", shard="s", error="", model_id="m")


def test_validate_rows_names_each_broken_invariant():
    ok, err = _rows()
    wrong_area = dict(ok, segments_info=[dict(ok["segments_info"][0], area=5),
                                        ok["segments_info"][1]])
    missing_id = dict(ok, image_id="s/c", segments_info=ok["segments_info"][:1])
    wrong_size = dict(ok, image_id="s/d", width=7)
    err_with_png = dict(err, panoptic_png=b"png")
    problems = validate_rows(to_table([wrong_area, missing_id, wrong_size, err_with_png, err]))
    text = "\n".join(problems)
    assert "s/a: segment 1: area/bbox 5/[1, 2, 3, 2] != pixels' 6/[1, 2, 3, 2]" in text
    assert f"s/c: ids in panoptic_png [1, {BIG_ID}] != ids in segments_info [1]" in text
    assert "s/d: panoptic_png is 6 x 5, the row says 7 x 5" in text
    assert "s/b: error row has a panoptic_png" in text
    assert "s/b: image_id appears more than once" in text
    assert validate_rows(pa.table({"image_id": ["x"]}))[0].startswith("schema is")
