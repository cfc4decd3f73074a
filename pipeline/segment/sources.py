"""Input shards: what lies at a source URI, and the encoded images inside one shard.

Three kinds of shard, found by file extension under the source URI (recursively; names starting
with ``.`` or ``_`` are skipped, like Spark's and Ray's ``_SUCCESS`` / ``.DS_Store``):

- ``tar``: a WebDataset-style ``.tar`` (or ``.tar.gz`` / ``.tgz``) file. Members are grouped by
  key as WebDataset does (``dir/k.jpg`` and ``dir/k.json`` share key ``dir/k``); per key, the
  member whose whole extension is an image one is the input (``k.seg.png`` is not an image
  member). ``image_id`` is ``<shard id>/<key>``.
- ``parquet``: a ``.parquet`` file with an image-bytes column (binary, or a Hugging Face
  ``{"bytes", "path"}`` struct), named or found by name; an optional id column gives the member
  key, else the row number does. ``image_id`` is ``<shard id>/<key>``.
- ``files``: loose image files, grouped into shards of about ``files_per_shard``.

Shard ids are relative to the source URI, so the same data copied elsewhere keeps its ids.

**Incremental runs.** A re-run skips shards whose id is already in the output, so an id must
change whenever the set of inputs behind it changes, and stay put otherwise:

- tar / parquet: the id is the relative path (``images/part-0003.tar``); new files are new
  shards. Rewriting a file in place keeps its id but changes :attr:`Shard.version` (ETag /
  generation / mtime), for callers that want to detect it.
- files: sorted by relative path, cut into runs by content-defined chunking on the names: a file
  starts a new shard when a hash of its relative path is 0 modulo ``files_per_shard`` (the first
  file always does). Boundaries depend only on names, so adding, removing or renaming one file
  changes only the shard it falls in (and splits or merges it with a neighbour if the file is a
  boundary itself); every other shard keeps its members and its id. The id is the members'
  common folder plus a digest of the member list (``photos/2024/files-3f2a9c1b0d4e``), so a
  changed shard gets a new id and is processed again; an old id that no longer appears in a
  listing is stale. ``image_id`` of a loose file is its relative path, which no regrouping
  changes. Shard sizes vary around ``files_per_shard`` (geometrically; the largest of K shards
  holds about ``files_per_shard * ln K`` files). Keep ``files_per_shard`` the same for every
  run into one output: another value regroups everything under new ids.

**One record per input.** :func:`iter_shard_records` yields one record per image member it can
enumerate, with ``data`` (bytes) or ``error`` (a message) set. A member that cannot be read
becomes an error record; when the rest of a shard cannot be enumerated (a damaged or cut tar, an
unreadable Parquet footer) one shard-level error record with ``image_id == shard.id`` stands for
what could not be listed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

from model.storage import (
    absolute,
    filesystem_for,
    join,
    shown_uri,
    split_endpoint,
    storage_errors,
)
from pipeline.segment.parquet import check_columns, iter_parquet_records
from pipeline.segment.shards import IMAGE_EXTENSIONS, Shard, ShardKind, image_extension, record
from pipeline.segment.tar import iter_tar_records

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_FILES_PER_SHARD = 256
_READ_BATCH = 16  # loose files fetched concurrently per request batch (s3fs runs them async)


def list_shards(
    src_uri: str,
    *,
    files_per_shard: int = DEFAULT_FILES_PER_SHARD,
    image_column: str | None = None,
    id_column: str | None = None,
    on_shard: Callable[[Shard], object] | None = None,
) -> list[Shard]:
    """Every shard at ``src_uri`` (a folder / prefix, or one tar, Parquet or image file), by id.

    Reads listings only, no image data (the first Parquet file's schema is checked so a missing
    image column fails here, not in every task). Raises FileNotFoundError when nothing is at the
    URI, ValueError when nothing there is an image input or the scheme is unknown,
    PermissionError when storage refuses access.

    The listing streams: ``on_shard``, when given, is called with each shard as soon as it is
    known (in listing order, before the sort and the checks), so a caller can start work on the
    first shards while the rest of a big archive is still being listed. A local folder is walked
    with ``os.scandir`` in sorted order (only image, tar and Parquet files are stat-ed); other
    stores are listed with one recursive ``find``.
    """
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be at least 1, got {files_per_shard}")
    src_uri = absolute(src_uri)
    fs, root = filesystem_for(src_uri)
    with storage_errors(src_uri):
        if fs.isfile(root):
            shards = _single_file_shard(fs, root, src_uri, image_column, id_column)
            for shard in shards if on_shard else ():
                on_shard(shard)
            return shards
        if not fs.isdir(root):
            raise FileNotFoundError(
                f"nothing found at {shown_uri(src_uri)}; check the path (and bucket name)"
            )
        shards = []
        grouper = _FileGrouper(src_uri, files_per_shard)
        for rel, info, kind in _listing(fs, root):
            if kind == "files":
                shard = grouper.add(rel, info)
            else:
                shard = Shard(id=rel, uri=join(src_uri, rel), kind=kind,
                              size=int(info.get("size") or 0), version=_version(info),
                              image_column=image_column, id_column=id_column)
            if shard is not None:
                shards.append(shard)
                if on_shard:
                    on_shard(shard)
        last = grouper.close()
        if last is not None:
            shards.append(last)
            if on_shard:
                on_shard(last)
    if not shards:
        raise ValueError(
            f"no images found at {shown_uri(src_uri)}: expected .tar or .parquet shards or image "
            f"files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    shards.sort(key=lambda s: s.id)
    with storage_errors(src_uri):
        _check_parquet_columns([s for s in shards if s.kind == "parquet"])
    return shards


def iter_shard_records(shard: Shard) -> Iterator[dict[str, Any]]:
    """One record per image input of ``shard``, streamed: ``image_id``, ``image_uri``,
    ``shard`` (its id), ``data`` (encoded bytes or None) and ``error`` (None or why not)."""
    if shard.kind == "tar":
        yield from iter_tar_records(shard)
    elif shard.kind == "parquet":
        yield from iter_parquet_records(shard)
    elif shard.kind == "files":
        yield from _iter_file_records(shard)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}; expected tar, files or parquet")


def _iter_file_records(shard: Shard) -> Iterator[dict[str, Any]]:
    fs, root = filesystem_for(shard.uri)
    root = root.rstrip("/")
    for start in range(0, len(shard.members), _READ_BATCH):
        batch = shard.members[start : start + _READ_BATCH]
        paths = [f"{root}/{rel}" for rel in batch]
        try:
            # cat_ranges, not cat: no glob expansion of names like "a[1].jpg"; s3fs runs it async.
            fetched = fs.cat_ranges(paths, None, None, on_error="return")
        except Exception as e:  # noqa: BLE001 - one bad request must not lose the whole batch
            fetched = [e] * len(paths)
        for rel, data in zip(batch, fetched):
            uri = shown_uri(join(shard.uri, rel))
            if isinstance(data, BaseException):
                yield _file_record(shard, rel, uri, error=_read_failure(data))
            else:
                yield _file_record(shard, rel, uri, data=bytes(data))


def _file_record(shard: Shard, rel: str, uri: str, **kwargs) -> dict[str, Any]:
    # A loose file's id is its relative path: regrouping files into shards never changes it.
    row = record(shard, key=rel, uri=uri, **kwargs)
    row["image_id"] = rel
    return row


def _read_failure(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "cannot read file: it disappeared after the listing"
    return f"cannot read file: {type(error).__name__}: {error}"


def _group_files(
    infos: dict[str, dict], *, src_uri: str, files_per_shard: int
) -> list[Shard]:
    """Content-defined chunking of loose files by name (see the module docstring)."""
    grouper = _FileGrouper(src_uri, files_per_shard)
    shards = [s for s in (grouper.add(rel, infos[rel]) for rel in sorted(infos)) if s]
    last = grouper.close()
    return shards + [last] if last else shards


class _FileGrouper:
    """:func:`_group_files`, streamed: feed loose files in sorted order of relative path; each
    shard comes out as soon as the file after its last member (a boundary) is seen."""

    def __init__(self, src_uri: str, files_per_shard: int):
        self.src_uri, self.files_per_shard = src_uri, files_per_shard
        self.members: list[str] = []
        self.infos: list[dict] = []

    def add(self, rel: str, info: dict) -> Shard | None:
        """Adds one file; returns the shard it closes, if it starts a new one."""
        if self.members and rel <= self.members[-1]:
            raise AssertionError(f"loose files out of order: {rel!r} after "
                                 f"{self.members[-1]!r}")
        done = self.close() if self.members and _is_boundary(rel, self.files_per_shard) else None
        self.members.append(rel)
        self.infos.append(info)
        return done

    def close(self) -> Shard | None:
        """The shard of the files added since the last boundary (None if there are none)."""
        members, infos = self.members, self.infos
        if not members:
            return None
        self.members, self.infos = [], []
        names = "\n".join(members).encode()
        digest = hashlib.blake2b(names, digest_size=6).hexdigest()
        # Members are sorted: every one lies between the first and the last, so it shares
        # whatever leading folders those two share.
        folder = os.path.commonpath([os.path.dirname(m) or "." for m in (members[0], members[-1])])
        prefix = "" if folder in ("", ".") else folder + "/"
        versions = "\n".join(f"{m}\t{i.get('size')}\t{_version(i)}"
                             for m, i in zip(members, infos))
        return Shard(id=f"{prefix}files-{digest}", uri=self.src_uri, kind="files",
                     size=sum(int(i.get("size") or 0) for i in infos),
                     version=hashlib.blake2b(versions.encode(), digest_size=8).hexdigest(),
                     members=tuple(members))


def _listing(fs, root: str) -> Iterator[tuple[str, dict, ShardKind]]:
    """(relative path, info, kind) of every input file below ``root`` that is not hidden, in
    sorted order of relative path; info as fsspec's ``find(detail=True)`` has it (size,
    mtime...)."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield from _walk_local(root.rstrip("/") or "/")
        return
    root = root.rstrip("/")
    for path, info in fs.find(root, detail=True).items():  # sorted by path
        rel = path[len(root) :].lstrip("/") if path.startswith(root + "/") else None
        if rel and info.get("type") != "directory" and not _hidden(rel):
            kind = _kind_of(rel)
            if kind is not None:
                yield rel, info, kind


def _walk_local(root: str) -> Iterator[tuple[str, dict, ShardKind]]:
    """A local folder as fsspec's ``find`` sees it (only directories are descended into, not
    links to them; a folder that cannot be listed is left out), streamed in sorted order of
    relative path: depth first, each folder's entries sorted by name with "/" appended to
    folder names. Hidden names are pruned; only inputs (by name) are stat-ed."""
    # The stack holds (sort key, path, info, kind), the next one to visit last; info is None
    # for a folder.
    stack: list[tuple[str, str, dict | None, ShardKind | None]] = [("", root, None, None)]
    while stack:
        rel, path, info, kind = stack.pop()
        if info is not None:
            yield rel, info, kind
            continue
        entries = []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    name = entry.name
                    if name.startswith((".", "_")):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        entries.append((f"{rel}{name}/", entry.path, None, None))
                    elif (kind := _kind_of(name)) is not None:
                        try:
                            entries.append((rel + name, entry.path, _local_info(entry), kind))
                        except FileNotFoundError:  # gone since the scan: fsspec's ls skips it
                            continue
        except OSError:  # fsspec's walk omits a folder it cannot list
            continue
        entries.sort(key=lambda e: e[0], reverse=True)
        stack.extend(entries)


def _local_info(entry: os.DirEntry) -> dict:
    """What fsspec's LocalFileSystem.info reports of a scandir entry, for :func:`_version`."""
    out = entry.stat(follow_symlinks=False)
    size = out.st_size
    if entry.is_symlink():
        try:
            size = entry.stat(follow_symlinks=True).st_size
        except OSError:
            size = 0
    return {"size": size, "type": "file" if entry.is_file(follow_symlinks=False) else "other",
            "mtime": out.st_mtime, "created": getattr(out, "st_birthtime", out.st_ctime)}


def _is_boundary(rel: str, files_per_shard: int) -> bool:
    h = int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "big")
    return h % files_per_shard == 0


def _single_file_shard(
    fs, path: str, src_uri: str, image_column: str | None, id_column: str | None
) -> list[Shard]:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    kind = _kind_of(name)
    if kind is None:
        raise ValueError(
            f"{shown_uri(src_uri)} is neither a .tar or .parquet shard nor an image file "
            f"({', '.join(IMAGE_EXTENSIONS)}); point at one of those or at their folder"
        )
    info = fs.info(path)
    if kind == "files":
        return _group_files({name: info}, src_uri=_parent_uri(src_uri), files_per_shard=1)
    shard = Shard(id=name, uri=src_uri, kind=kind, size=int(info.get("size") or 0),
                  version=_version(info), image_column=image_column, id_column=id_column)
    _check_parquet_columns([shard])
    return [shard]


def _parent_uri(uri: str) -> str:
    clean, endpoint = split_endpoint(uri)
    parent = clean.rsplit("/", 1)[0]
    return f"{parent}?{urlencode({'endpoint': endpoint})}" if endpoint else parent


def _check_parquet_columns(shards: list[Shard], *, tries: int = 3) -> None:
    """Fail early on a missing image column: check the first Parquet footer that reads."""
    if not shards or shards[0].kind != "parquet":
        return
    for shard in shards[:tries]:
        if check_columns(shard):
            return


def _kind_of(name: str) -> ShardKind | None:
    lower = name.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if image_extension(name) is not None:
        return "files"
    return None


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _version(info: dict) -> str:
    """What changes when an object's content changes, from whatever the store reports."""
    for key in ("ETag", "etag", "generation", "md5Hash", "crc32c"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        if info.get(key):
            return f"{info.get('size')}-{info[key]}"
    return str(info.get("size"))


