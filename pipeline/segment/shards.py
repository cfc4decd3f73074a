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
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "jfif", "jpe",
                    "heic", "heif", "avif")
_IMAGE_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}
# Extensions that are known not to be images: such files are skipped without being opened.
# Any other file whose name has no image extension is opened to look at its first bytes.
NOT_IMAGE_EXTENSIONS = frozenset(
    "json jsonl txt csv tsv xml yaml yml md rst html htm pdf log cls npy npz pt pth pkl pickle "
    "safetensors zip gz bz2 xz zst 7z rar mp4 mov avi mkv webm mp3 wav flac py sh ipynb db "
    "sqlite lock ini cfg toml arrow feather orc avro seg idx".split())
SNIFF_BYTES = 32  # how much of a file :func:`sniff_image_format` needs

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# ISO base media files (HEIF / AVIF): "ftyp" at byte 4, then the major brand.
_HEIF_BRANDS = {b"heic": "HEIF", b"heix": "HEIF", b"heim": "HEIF", b"heis": "HEIF",
                b"hevc": "HEIF", b"hevx": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF",
                b"avif": "AVIF", b"avis": "AVIF"}


# Names that are never inputs: the markers and scratch folders of output committers (Spark's,
# Hadoop's, Delta's, panoray's own). Any other name starting with "_" is an ordinary input
# (``_DSC0001.JPG`` is what many cameras call their photos).
OUTPUT_MARKER = "_panoray_output.json"  # at the root of every panoray segment output
MARKER_NAMES = frozenset({"_SUCCESS", "_FAILURE", "_metadata", "_common_metadata",
                          "_temporary", "_delta_log", "_spark_metadata", "_staging",
                          "_panoray.lock", OUTPUT_MARKER})
MARKER_PREFIXES = ("_committed_", "_started_", "_temporary", "_SUCCESS")


def is_marker(name: str) -> bool:
    """A job's marker or scratch file / folder (see :data:`MARKER_NAMES`)."""
    return name in MARKER_NAMES or name.startswith(MARKER_PREFIXES)


def sniff_image_format(head: bytes) -> str | None:
    """The image format the first bytes of a file announce (``PNG``, ``JPEG``...), or None."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(head[8:12])
    return None


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
    ext = extension(name)
    return ext if ext in _IMAGE_RANK else None


def extension(name: str) -> str:
    """The last extension of a file name, lower case ("" when it has none)."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""


def image_rank(ext: str) -> int:
    """Preference of an image extension when a key has several (lower is preferred)."""
    return _IMAGE_RANK[ext]
