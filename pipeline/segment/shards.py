"""The shard contract: one unit of input work, and the records a shard yields.

A :class:`Shard` is a tar file, a Parquet file, or a group of loose image files (what
:func:`pipeline.segment.sources.list_shards` finds). Reading one yields one *record* per image
input (:func:`record`): ``image_id``, ``image_uri``, ``shard`` (its id), ``data`` (encoded bytes
or None) and ``error`` (None or why not). The readers of each kind (``sources`` for loose files,
``tar``, ``parquet``) build on this module only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from model.storage import redact

ShardKind = Literal["tar", "files", "parquet"]

# Image extensions, in order of preference when one key has several image members.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_IMAGE_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}


@dataclass(frozen=True)
class Shard:
    """One unit of input work: a tar file, a Parquet file, or a group of loose image files."""

    id: str  # stable id relative to the source URI, e.g. "images/part-0003.tar"
    uri: str  # the tar / Parquet file; for "files" the source URI the members are relative to
    kind: ShardKind
    size: int  # bytes on storage (for "files": all members together)
    version: str  # changes when content changes: ETag / generation / size+mtime, or a digest
    members: tuple[str, ...] = ()  # "files": member paths relative to ``uri``, sorted
    image_column: str | None = None  # "parquet": the bytes column; None = find it by name
    id_column: str | None = None  # "parquet": the member-key column; None = the row number

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (e.g. a Ray Data row); :meth:`from_dict` reverses it."""
        row = asdict(self)
        row["members"] = list(self.members)
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Shard:
        fields = {k: row[k] for k in cls.__dataclass_fields__ if k in row}
        fields["members"] = tuple(fields.get("members") or ())
        return cls(**fields)


def record(
    shard: Shard, *, key: str, uri: str, data: bytes | None = None, error: str | None = None
) -> dict[str, Any]:
    """A source record; ``key`` is appended to the shard id unless it is the shard itself."""
    image_id = shard.id if key == "" else f"{shard.id}/{key}"
    return {"image_id": image_id, "image_uri": uri, "shard": shard.id, "data": data,
            "error": None if error is None else redact(error)}


def image_extension(name: str) -> str | None:
    """The image extension of a file name (lower case), or None if it is not an image name."""
    base = name.rsplit("/", 1)[-1]
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    return ext if ext in _IMAGE_RANK else None


def image_rank(ext: str) -> int:
    """Preference of an image extension when a key has several (lower is preferred)."""
    return _IMAGE_RANK[ext]
