"""Input shards: what lies at a source URI, and the encoded images inside one shard.

Three kinds of shard, found by file extension under the source URI (recursively), or by the
first bytes of a file whose name has no image extension (a JPEG called ``IMG_0001``):

- ``tar``: a WebDataset-style ``.tar`` (or ``.tar.gz`` / ``.tgz``) file. Members are grouped by
  key as WebDataset does (``dir/k.jpg`` and ``dir/k.json`` share key ``dir/k``); per key, the
  member whose whole extension is an image one is the input (``k.seg.png`` is not an image
  member). ``image_id`` is ``<shard id>/<key>``.
- ``parquet``: a ``.parquet`` file with an image-bytes column (binary, or a Hugging Face
  ``{"bytes", "path"}`` struct), named or found by name; an optional id column gives the member
  key, else the row number does. ``image_id`` is ``<shard id>/<key>``.
- ``files``: loose image files, grouped into shards of about ``files_per_shard``.

Shard ids are relative to the source URI, so the same data copied elsewhere keeps its ids.

**Every file is accounted for.** A file gets a row, or it is counted in :class:`Skipped` with
why: hidden (a name starting with ``.``), a job's marker or scratch file (``_SUCCESS``,
``_temporary/``, ``_delta_log/``; see :func:`pipeline.segment.shards.is_marker`; other names
starting with ``_`` are inputs), a panoray output (a folder holding
:data:`~pipeline.segment.shards.OUTPUT_MARKER`, or the job's own DST inside SRC), not an image
(by a known extension such as ``.json``, or by its first bytes), or a file or folder that cannot
be read.

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
from dataclasses import dataclass, field
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
from pipeline.segment.shards import (
    IMAGE_EXTENSIONS,
    NOT_IMAGE_EXTENSIONS,
    OUTPUT_MARKER,
    SNIFF_BYTES,
    Shard,
    ShardKind,
    extension,
    image_extension,
    is_marker,
    record,
    sniff_image_format,
)
from pipeline.segment.tar import iter_tar_records

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_FILES_PER_SHARD = 256
_READ_BATCH = 16  # loose files fetched concurrently per request batch (s3fs runs them async)


SKIP_HIDDEN = "hidden"
SKIP_MARKER = "job marker"
SKIP_OUTPUT = "panoray output"
SKIP_NOT_IMAGE = "not an image"
SKIP_UNREADABLE = "unreadable"


@dataclass
class Skipped:
    """What under SRC gets no row, and why: a count per reason and the first few names of each
    (a skipped folder counts once, with a trailing "/")."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, rel: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        names = self.examples.setdefault(reason, [])
        if len(names) < 3:
            names.append(rel)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def render(self) -> str:
        """One line, e.g. "3 skipped: 2 hidden (.DS_Store, .cache/); 1 not an image (a.txt)"."""
        parts = []
        for reason, n in sorted(self.counts.items()):
            names = self.examples[reason]
            more = ", ..." if n > len(names) else ""
            parts.append(f"{n} {reason} ({', '.join(names)}{more})")
        return f"{self.total} skipped: " + "; ".join(parts)


def list_shards(
    src_uri: str,
    *,
    files_per_shard: int = DEFAULT_FILES_PER_SHARD,
    image_column: str | None = None,
    id_column: str | None = None,
    on_shard: Callable[[Shard], object] | None = None,
    exclude: str | None = None,
    skipped: Skipped | None = None,
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

    ``exclude``: a URI (the job's DST) whose subtree is never read as input when it lies inside
    SRC. ``skipped``: filled with every file and folder that gets no row, and why.
    """
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be at least 1, got {files_per_shard}")
    skipped = Skipped() if skipped is None else skipped
    src_uri = absolute(src_uri)
    fs, root = filesystem_for(src_uri)
    if exclude:
        check_output_place(src_uri, exclude)
    excluded = _relative_inside(src_uri, exclude) if exclude else None
    with storage_errors(src_uri):
        _refuse_an_output(fs, root, src_uri)
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
        for rel, info, kind in _listing(fs, root, skipped=skipped, excluded=excluded):
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


def _listing(fs, root: str, *, skipped: Skipped,
             excluded: str | None) -> Iterator[tuple[str, dict, ShardKind]]:
    """(relative path, info, kind) of every input file below ``root``, in sorted order of
    relative path; info as fsspec's ``find(detail=True)`` has it (size, mtime...). What is
    not an input goes to ``skipped``; ``excluded`` (a relative folder) is never entered."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield from _walk_local(root.rstrip("/") or "/", skipped=skipped, excluded=excluded)
        return
    root = root.rstrip("/")
    found = {}
    for path, info in fs.find(root, detail=True).items():  # sorted by path
        rel = path[len(root) :].lstrip("/") if path.startswith(root + "/") else None
        if rel and info.get("type") != "directory":
            found[rel] = (path, info)
    outputs = {rel.rsplit("/", 1)[0] for rel in found
               if rel.endswith("/" + OUTPUT_MARKER)}
    if excluded:
        outputs.add(excluded)
    told: set[str] = set()  # skipped folders already counted
    for rel, (path, info) in found.items():
        parts = rel.split("/")
        folder = next((("/".join(parts[: i + 1]), reason) for i in range(len(parts) - 1)
                       if (reason := _skip_reason(parts[i]) or
                           (SKIP_OUTPUT if "/".join(parts[: i + 1]) in outputs else None))),
                      None)
        if folder is not None:
            if folder[0] not in told:
                told.add(folder[0])
                skipped.add(folder[1], folder[0] + "/")
            continue
        if (reason := _skip_reason(parts[-1])) is not None:
            skipped.add(reason, rel)
            continue
        kind = _kind_of(parts[-1]) or _sniffed_kind(
            parts[-1], lambda p=path: fs.cat_file(p, start=0, end=SNIFF_BYTES))
        if kind in (SKIP_NOT_IMAGE, SKIP_UNREADABLE):
            skipped.add(kind, rel)
        else:
            yield rel, info, kind


def _walk_local(root: str, *, skipped: Skipped,
                excluded: str | None) -> Iterator[tuple[str, dict, ShardKind]]:
    """A local folder as fsspec's ``find`` sees it (only directories are descended into, not
    links to them), streamed in sorted order of relative path: depth first, each folder's
    entries sorted by name with "/" appended to folder names. Skipped names are pruned and
    counted; only inputs are stat-ed."""
    # The stack holds (sort key, path, info, kind), the next one to visit last; info is None
    # for a folder.
    stack: list[tuple[str, str, dict | None, ShardKind | None]] = [("", root, None, None)]
    while stack:
        rel, path, info, kind = stack.pop()
        if info is not None:
            yield rel, info, kind
            continue
        try:
            with os.scandir(path) as it:
                listed = list(it)
        except OSError:
            if not rel:  # SRC itself
                raise
            skipped.add(SKIP_UNREADABLE, rel)  # a folder that cannot be listed
            continue
        if rel and (rel.rstrip("/") == excluded or
                    any(e.name == OUTPUT_MARKER for e in listed)):
            skipped.add(SKIP_OUTPUT, rel)
            continue
        entries = []
        for entry in listed:
            name = entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if (reason := _skip_reason(name)) is not None:
                skipped.add(reason, f"{rel}{name}/" if is_dir else rel + name)
                continue
            if is_dir:
                entries.append((f"{rel}{name}/", entry.path, None, None))
                continue
            kind = _kind_of(name) or _sniffed_kind(name, lambda p=entry.path: _head(p))
            if kind in (SKIP_NOT_IMAGE, SKIP_UNREADABLE):
                skipped.add(kind, rel + name)
                continue
            try:
                entries.append((rel + name, entry.path, _local_info(entry), kind))
            except FileNotFoundError:  # gone since the scan: fsspec's ls skips it
                continue
        entries.sort(key=lambda e: e[0], reverse=True)
        stack.extend(entries)


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


def _skip_reason(name: str) -> str | None:
    if name.startswith("."):
        return SKIP_HIDDEN
    if name.startswith("_") and is_marker(name):
        return SKIP_MARKER
    return None


def _sniffed_kind(name: str, head: Callable[[], bytes]) -> str:
    """"files" for a file whose name has no image extension but whose first bytes are an
    image's; else why it is skipped. Files with a known non-image extension are not opened."""
    if extension(name) in NOT_IMAGE_EXTENSIONS:
        return SKIP_NOT_IMAGE
    try:
        first = head()
    except OSError:
        return SKIP_UNREADABLE
    return "files" if sniff_image_format(first) else SKIP_NOT_IMAGE


def check_output_place(src_uri: str, dst_uri: str) -> None:
    """Refuse, before anything is written, a DST that is SRC itself and a SRC that is a
    panoray output (a DST inside SRC is fine: the listing leaves it out)."""
    if _relative_inside(src_uri, dst_uri) == "":
        raise ValueError(f"the output {shown_uri(dst_uri)} is the input folder itself; write "
                         "the output somewhere else (its files would be read as input)")
    fs, root = filesystem_for(absolute(src_uri))
    with storage_errors(src_uri):
        _refuse_an_output(fs, root, src_uri)


def _refuse_an_output(fs, root: str, src_uri: str) -> None:
    if fs.exists(f"{root.rstrip('/')}/{OUTPUT_MARKER}"):
        raise ValueError(f"{shown_uri(src_uri)} is a panoray output, not images; point at "
                         "the images it was made from")


def _relative_inside(src_uri: str, uri: str) -> str | None:
    """``uri``'s path relative to SRC when it lies inside it on the same store ("" when it is
    SRC itself), else None."""
    src_fs, src_root = filesystem_for(absolute(src_uri))
    fs, path = filesystem_for(absolute(uri))
    if type(fs) is not type(src_fs) or split_endpoint(uri)[1] != split_endpoint(src_uri)[1]:
        return None
    src_root, path = src_root.rstrip("/"), path.rstrip("/")
    if path == src_root:
        return ""
    return path[len(src_root) + 1 :] if path.startswith(src_root + "/") else None


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
    if kind is None and _sniffed_kind(
            name, lambda: fs.cat_file(path, start=0, end=SNIFF_BYTES)) == "files":
        kind = "files"
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


def _version(info: dict) -> str:
    """What changes when an object's content changes, from whatever the store reports."""
    for key in ("ETag", "etag", "generation", "md5Hash", "crc32c"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        if info.get(key):
            return f"{info.get('size')}-{info[key]}"
    return str(info.get("size"))


