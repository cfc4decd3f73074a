"""Stream the images of one Parquet shard (contract in pipeline.segment.sources).

The image column holds encoded bytes: a binary column, or a Hugging Face ``Image`` feature (a
struct with a ``bytes`` field). Without a name given, the column is found by name (``image``,
``image_bytes``, ``img``, ``jpg``, ``png``, ``bytes``, ``content``, ``data``...), else taken if it
is the only binary column. The member key is the id column's value (given, or one named
``__key__``, ``key`` or ``image_id``), else the row number in the file.

Rows are read a few at a time, one row group after another, reading only the image and id
columns. A row group that cannot be read yields one error record per row it holds (the count
comes from the footer); a file whose footer cannot be read yields one shard-level error record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from model.storage import filesystem_for, shown_uri, storage_errors
from pipeline.segment.shards import Shard, record

_IMAGE_NAMES = ("image", "image_bytes", "img", "jpg", "jpeg", "png", "webp", "bytes", "content",
                "data", "image_data")
_ID_NAMES = ("__key__", "key", "image_id")
_BATCH_ROWS = 32


def check_columns(shard: Shard) -> bool:
    """Raise ValueError now if ``shard`` has no usable image column (reads its footer only).

    Returns False, without raising, when the footer cannot be read: that file is damaged, which
    its own error record will say; the caller can check another file instead.
    """
    fs, path = filesystem_for(shard.uri)
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except Exception:  # noqa: BLE001 - damage is reported per file when it is read
        return False
    image_column(schema, requested=shard.image_column, uri=shard.uri)
    id_column(schema, requested=shard.id_column, uri=shard.uri)
    return True


def image_column(schema: pa.Schema, *, requested: str | None, uri: str) -> str:
    """The name of the image-bytes column of ``schema`` (see the module docstring)."""
    if requested is not None:
        if requested not in schema.names:
            raise ValueError(
                f"column {requested!r} not found in {shown_uri(uri)} (columns: {schema.names}); "
                "pass the name of the column that holds the image bytes"
            )
        if not _holds_bytes(schema.field(requested).type):
            raise ValueError(
                f"column {requested!r} in {shown_uri(uri)} holds {schema.field(requested).type}, "
                "not image bytes; pass a binary column"
            )
        return requested
    candidates = [f.name for f in schema if _holds_bytes(f.type)]
    by_name = {name.lower(): name for name in candidates}
    for wanted in _IMAGE_NAMES:
        if wanted in by_name:
            return by_name[wanted]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"cannot tell which column of {shown_uri(uri)} holds the image bytes (binary columns: "
        f"{candidates}); pass --image-column"
    )


def id_column(schema: pa.Schema, *, requested: str | None, uri: str) -> str | None:
    """The member-key column of ``schema``, or None to key rows by their number."""
    if requested is not None:
        if requested not in schema.names:
            raise ValueError(
                f"id column {requested!r} not found in {shown_uri(uri)} (columns: "
                f"{schema.names}); pass an existing column or none to use row numbers"
            )
        return requested
    return next((name for name in _ID_NAMES if name in schema.names), None)


def iter_parquet_records(shard: Shard) -> Iterator[dict[str, Any]]:
    """One record per row of the Parquet shard; see the module docstring for damaged files."""
    fs, path = filesystem_for(shard.uri)
    seen: dict[str, int] = {}
    try:
        with storage_errors(shard.uri), fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            image = image_column(parquet.schema_arrow, requested=shard.image_column, uri=shard.uri)
            key_column = id_column(parquet.schema_arrow, requested=shard.id_column, uri=shard.uri)
            columns = [image] if key_column is None else [image, key_column]
            first_row = 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                done = 0
                try:
                    for batch in parquet.iter_batches(
                        batch_size=_BATCH_ROWS, row_groups=[group], columns=columns
                    ):
                        data = _bytes_column(batch.column(0))
                        keys = batch.column(1).to_pylist() if key_column else [None] * len(data)
                        for value, key in zip(data, keys):
                            row_key = _key(key, first_row + done, seen)
                            uri = shown_uri(shard.uri, row_key)
                            if value is None:
                                error = f"no image bytes in column {image!r} (null)"
                                yield record(shard, key=row_key, uri=uri, error=error)
                            else:
                                yield record(shard, key=row_key, uri=uri, data=value)
                            done += 1
                except Exception as e:  # noqa: BLE001 - a bad row group becomes error records
                    keys = _group_keys(parquet, group, key_column, rows)
                    for offset in range(done, rows):
                        row_key = _key(keys[offset], first_row + offset, seen)
                        error = f"cannot read row group {group}: {type(e).__name__}: {e}"
                        yield record(shard, key=row_key, uri=shown_uri(shard.uri, row_key),
                                     error=error)
                first_row += rows
    except Exception as e:  # noqa: BLE001 - an unreadable file becomes one shard-level record
        error = f"cannot read Parquet file: {type(e).__name__}: {e}; its rows cannot be listed"
        yield record(shard, key="", uri=shown_uri(shard.uri), error=error)


def _holds_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_binary_view(kind):
        return True
    if pa.types.is_struct(kind):  # Hugging Face datasets' Image feature: {bytes, path}
        index = kind.get_field_index("bytes")
        return index >= 0 and _holds_bytes(kind.field(index).type)
    return False


def _bytes_column(column: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):
        return column.field("bytes").to_pylist()
    return column.to_pylist()


def _key(value: Any, row: int, seen: dict[str, int]) -> str:
    key = str(row) if value is None else str(value)
    seen[key] = seen.get(key, 0) + 1
    return key if seen[key] == 1 else f"{key}#{seen[key]}"


def _group_keys(parquet: pq.ParquetFile, group: int, column: str | None, rows: int) -> list:
    """The id values of one row group, if that column at least can be read."""
    if column is not None:
        try:
            return parquet.read_row_group(group, columns=[column]).column(0).to_pylist()
        except Exception:  # noqa: BLE001 - fall back to row numbers
            pass
    return [None] * rows
