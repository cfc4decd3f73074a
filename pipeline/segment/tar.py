"""Stream the image members of one WebDataset-style tar shard (contract in pipeline.segment.shards).

The tar is read front to back in stream mode, so a shard on object storage is never downloaded
whole nor seeked around in. Members of one key are adjacent in WebDataset tars; when one key has
several image members (``k.jpg`` and ``k.png``) the preferred extension wins. A key that appears
again later (not adjacent) is a separate input, with ``#2``, ``#3``... appended to its key.

Damage: Python's tarfile stops silently at a broken header in the middle of an archive, so after
the last member the next 512 bytes must be a zero block or absent (a tar without end marker). A
partial or non-zero block there means members were lost: one shard-level error record says so.
This check needs the uncompressed offset, so it is made for plain ``.tar`` files only.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from model.storage import filesystem_for, shown_uri, storage_errors
from pipeline.segment.shards import IMAGE_EXTENSIONS, Shard, image_rank, record

_BLOCK = 512


@dataclass
class _Member:
    key: str
    rank: int
    name: str
    data: bytes


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's split: ``"a/b/k.seg.png"`` -> (``"a/b/k"``, ``"seg.png"``): the key is the
    folder plus the name up to its first dot. None for names without extension or hidden ones."""
    if name.startswith("./"):
        name = name[2:]
    base = name.rsplit("/", 1)[-1]
    folder = name[: len(name) - len(base)]
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return folder + stem, ext.lower()


def iter_tar_records(shard: Shard) -> Iterator[dict[str, Any]]:
    """One record per image key in the tar, then a shard-level error record if members were lost."""
    fs, path = filesystem_for(shard.uri)
    seen: dict[str, int] = {}
    pending: _Member | None = None
    reading: str | None = None  # the member whose bytes are being read, for error records
    failure: str | None = None
    mode = "r|" if shard.uri.split("?", 1)[0].lower().endswith(".tar") else "r|*"
    try:
        with storage_errors(shard.uri), fs.open(path, "rb") as f:
            with tarfile.open(fileobj=f, mode=mode) as tar:
                for member in tar:
                    split = split_key(member.name) if member.isfile() else None
                    if split is None or split[1] not in IMAGE_EXTENSIONS:
                        continue
                    key, ext = split
                    if pending is not None and pending.key != key:
                        yield _emit(shard, pending, seen)
                        pending = None
                    reading = member.name
                    data = tar.extractfile(member).read()
                    reading = None
                    rank = image_rank(ext)
                    if pending is None or rank < pending.rank:
                        pending = _Member(key=key, rank=rank, name=member.name, data=data)
                end = tar.offset
            if mode == "r|":
                f.seek(end)
                failure = _tail_problem(f.read(2 * _BLOCK), after=pending.name if pending else None)
    except Exception as e:  # noqa: BLE001 - a damaged shard becomes error records, not a crash
        failure = _describe(e)
    if pending is not None:
        yield _emit(shard, pending, seen)
    if failure is None:
        return
    split = split_key(reading) if reading else None
    if split is not None and split[0] not in seen:
        message = f"cannot read tar member {reading}: {failure}; later members cannot be read"
        yield record(shard, key=split[0], uri=shown_uri(shard.uri, reading), error=message)
    else:
        count = sum(seen.values())
        message = f"damaged tar after {count} image(s): {failure}; later members cannot be read"
        yield record(shard, key="", uri=shown_uri(shard.uri), error=message)


def _emit(shard: Shard, member: _Member, seen: dict[str, int]) -> dict[str, Any]:
    seen[member.key] = seen.get(member.key, 0) + 1
    key = member.key if seen[member.key] == 1 else f"{member.key}#{seen[member.key]}"
    return record(shard, key=key, uri=shown_uri(shard.uri, member.name), data=member.data)


def _tail_problem(tail: bytes, *, after: str | None) -> str | None:
    where = f"after member {after}" if after else "at its start"
    if not tail:
        return None
    if len(tail) < _BLOCK:
        return f"the file ends inside a member header {where} (cut short)"
    if tail[:_BLOCK].strip(b"\0"):
        return f"the bytes {where} are not a valid tar header"
    return None


def _describe(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "the file disappeared after the listing"
    if isinstance(error, (tarfile.ReadError, EOFError)):
        return f"not a readable tar ({error})"
    return f"{type(error).__name__}: {error}"


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A WebDataset-style tar shard holding `members` (name -> bytes), in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
