"""Exactly-once output: one Parquet file per input shard, committed atomically, one writer.

Layout of an output URI ``DST``::

    DST/data/<shard key>.parquet               every row of one input shard; present == committed
    DST/_staging/<run>/<shard key>/<uuid>.parquet  parts written by workers (attempt-unique)
    DST/_panoray.lock                          the single-writer lock (JSON, with a heartbeat)

The protocol is Spark's output committer / Beam's finalize step: workers write their rows as
*parts* under names unique to the attempt (:meth:`OutputStore.stage_part`), so a retried or
duplicated task never overwrites anything; they report only (shard, part name, ordinals) to the
coordinator, which tracks each shard's ordinals (:class:`ShardProgress`) and, once every image
of a shard is in some part, authorises exactly one commit of it (:meth:`OutputStore.commit_parts`,
run on a worker: it reads the parts, keeps one row per image, and writes the shard's file).
Parts of killed runs are garbage: the next run holding the lock removes ``_staging``.

A shard's file appears in one atomic step (a single object PUT on object stores, a rename on a
local disk) under a name derived only from the shard's id, so a shard is either wholly in the
output or absent, and writing it again replaces it rather than adding rows. A re-run lists
``DST/data`` and skips every shard already there: that is what makes kills, re-runs and
incremental runs yield each input exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.storage import get_filesystem, join
from pipeline.segment.shards import OUTPUT_MARKER

log = logging.getLogger(__name__)

DATA_DIR = "data"
STAGING_DIR = "_staging"
LOCK_NAME = "_panoray.lock"


def shard_key(shard_id: str) -> str:
    """A file-name-safe, collision-free key for a shard id (readable prefix + hash)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", shard_id).strip("-.")[-80:] or "shard"
    digest = hashlib.sha1(shard_id.encode()).hexdigest()[:12]
    return f"{slug}-{digest}"


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _atomic_write(fs, path: str, data: bytes) -> None:
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        # One PUT (or one completed multipart upload): object stores never show a partial object.
        fs.pipe_file(path, data)


def _exclusive_create(fs, path: str, data: bytes) -> bool:
    """Create ``path`` only if absent; False if it exists."""
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except TypeError:  # a filesystem without exclusive create: best effort
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


class OutputStore:
    """The committed shards of one output URI."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = get_filesystem(uri)
        self.data_path = f"{self.path.rstrip('/')}/{DATA_DIR}"

    def mark(self) -> None:
        """Leave the output's marker at its root (once): a listing that meets this folder
        inside some SRC knows it for a panoray output and never reads it as input."""
        path = f"{self.path.rstrip('/')}/{OUTPUT_MARKER}"
        if not self.fs.exists(path):
            _atomic_write(self.fs, path, json.dumps(
                {"format": "panoray segments", "version": 1, "data": DATA_DIR}).encode())

    def shard_uri(self, shard_id: str) -> str:
        return join(self.uri, DATA_DIR, shard_key(shard_id) + ".parquet")

    def committed_keys(self) -> set[str]:
        """Keys of every shard whose file is in the output."""
        try:
            names = self.fs.ls(self.data_path, detail=False)
        except FileNotFoundError:
            return set()
        return {
            os.path.basename(n)[: -len(".parquet")]
            for n in names
            if n.endswith(".parquet") and ".tmp-" not in n
        }

    def is_committed(self, shard_id: str, keys: set[str] | None = None) -> bool:
        keys = self.committed_keys() if keys is None else keys
        return shard_key(shard_id) in keys

    def image_ids(self, key: str) -> set[str]:
        """The image ids in one committed shard file (reads that column only)."""
        with self.fs.open(f"{self.data_path}/{key}.parquet") as f:
            return set(pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist())

    def drop_images(self, key: str, image_ids: set[str]) -> int:
        """Remove rows of `image_ids` from one committed shard file, atomically; returns how
        many went. A file left with no rows is deleted."""
        path = f"{self.data_path}/{key}.parquet"
        with self.fs.open(path) as f:
            table = pq.read_table(f)
        keep = [i not in image_ids for i in table.column("image_id").to_pylist()]
        dropped = len(keep) - sum(keep)
        if dropped == 0:
            return 0
        if not any(keep):
            self.fs.rm_file(path)
            return dropped
        buf = io.BytesIO()
        pq.write_table(table.filter(pa.array(keep)), buf, compression="zstd")
        _atomic_write(self.fs, path, buf.getvalue())
        return dropped

    def commit_shard(self, shard_id: str, table: pa.Table) -> str:
        """Write every row of one shard as one Parquet file, atomically; returns its path."""
        path = f"{self.data_path}/{shard_key(shard_id)}.parquet"
        _atomic_write(self.fs, path, _parquet_bytes(table))
        return path

    def committed_table(self, shard_id: str, schema: pa.Schema) -> pa.Table | None:
        """The committed rows of one shard, or None when it has no file in DST/data yet."""
        try:
            with self.fs.open(f"{self.data_path}/{shard_key(shard_id)}.parquet", "rb") as f:
                return pq.read_table(f, schema=schema)
        except FileNotFoundError:
            return None

    # -- parts: what workers write before a shard is committed ----------------------------

    def staging_path(self, run_id: str, shard_id: str) -> str:
        return f"{self.path.rstrip('/')}/{STAGING_DIR}/{run_id}/{shard_key(shard_id)}"

    def stage_part(self, run_id: str, shard_id: str, table: pa.Table) -> str:
        """Write some rows of one shard as a part under an attempt-unique name; returns its
        path (inside this store's filesystem). Nothing is visible to readers of ``data/``."""
        path = f"{self.staging_path(run_id, shard_id)}/{uuid.uuid4().hex}.parquet"
        _atomic_write(self.fs, path, _parquet_bytes(table))
        return path

    def commit_parts(self, shard_id: str, parts: list[str], *, expected: int,
                     schema: pa.Schema) -> pa.Table:
        """Commit one shard from its parts: one row per ``image_id`` (a part written twice by a
        retried task adds nothing), sorted by ``image_id``, checked against ``expected``
        images, written atomically as the shard's file (``schema`` for a shard with no image);
        the parts are removed afterwards. Returns the committed table.

        Raises RuntimeError when the parts hold fewer distinct images than ``expected`` (the
        coordinator only commits complete shards, so this means a part went missing).
        """
        tables = []
        for part in parts:
            try:
                with self.fs.open(part, "rb") as f:
                    tables.append(pq.read_table(f, schema=schema))
            except FileNotFoundError:
                # A retried commit whose first attempt got as far as removing parts: the
                # shard's file is in place, and it is the answer (a commit is idempotent).
                done = self.committed_table(shard_id, schema)
                if done is None:
                    raise
                return done
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        first: dict[str, int] = {}
        for row, image_id in enumerate(table.column("image_id").to_pylist()):
            first.setdefault(image_id, row)
        if len(first) < expected:
            raise RuntimeError(f"shard {shard_id}: its parts hold {len(first)} of {expected} "
                               "images; re-run the job (committed shards are kept)")
        table = table.take(pa.array([first[i] for i in sorted(first)], type=pa.int64()))
        self.commit_shard(shard_id, table)
        for part in parts:
            try:
                self.fs.rm_file(part)
            except FileNotFoundError:
                pass
        return table

    def clear_staging(self, *, keep_run: str | None = None) -> int:
        """Remove the parts of earlier (killed) runs; only call it while holding the lock."""
        root = f"{self.path.rstrip('/')}/{STAGING_DIR}"
        try:
            runs = self.fs.ls(root, detail=False)
        except FileNotFoundError:
            return 0
        removed = 0
        for run in runs:
            if keep_run is not None and os.path.basename(run.rstrip("/")) == keep_run:
                continue
            try:
                self.fs.rm(run, recursive=True)
                removed += 1
            except FileNotFoundError:
                pass
        return removed


def commit_shard_parts(dst: str, shard_id: str, parts: list[str], expected: int,
                       schema: pa.Schema) -> dict[str, int]:
    """The one commit of a complete shard (run as a task on a worker): its parts -> its file
    in DST/data. Returns its ok / failed image counts."""
    table = OutputStore(dst).commit_parts(shard_id, parts, expected=expected, schema=schema)
    status = table.column("status").to_pylist()
    return {"ok": status.count("ok"), "failed": len(status) - status.count("ok")}


class Committer:
    """Commits shards from their parts; the job runs one as a long-lived, threaded actor."""

    def warm(self, dst: str) -> bool:
        """Make the storage client for `dst` now, while the predictors load their models (it
        takes a few hundred CPU-ms, which the first commit would otherwise pay mid-job).
        False if that failed: the first commit then says why."""
        try:
            store = OutputStore(dst)
            store.fs.exists(store.data_path)
            return True
        except Exception:  # noqa: BLE001 - only a head start; the commit reports errors
            return False

    def commit(self, dst: str, shard_id: str, parts: list[str], expected: int,
               schema: pa.Schema) -> dict[str, int]:
        return commit_shard_parts(dst, shard_id, parts, expected, schema)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ShardProgress:
    """The coordinator's view of the shards in flight: names, counts and ordinals, no rows.

    Each image of a shard has an ordinal (its position in the shard, 0..n-1) and each shard
    sends one end marker with n. Parts report the ordinals they hold; a shard is complete once
    every ordinal below n has been reported, whatever the order and however many duplicates.
    Memory: one bit per image of the shards in flight; nothing per committed shard.
    """

    def __init__(self) -> None:
        self._seen: dict[str, np.ndarray] = {}
        self._expected: dict[str, int] = {}
        self._parts: dict[str, list[str]] = {}

    @property
    def pending(self) -> int:
        return len(self._seen.keys() | self._expected.keys())

    def _bits(self, shard: str, need: int) -> np.ndarray:
        bits = self._seen.get(shard)
        if bits is None or len(bits) < need:
            grown = np.zeros(max(need, 2 * (0 if bits is None else len(bits)), 64), dtype=bool)
            if bits is not None:
                grown[: len(bits)] = bits
            self._seen[shard] = bits = grown
        return bits

    def add_part(self, shard: str, part: str, ordinals: np.ndarray) -> None:
        ordinals = np.asarray(ordinals, dtype=np.int64)
        if len(ordinals):
            self._bits(shard, int(ordinals.max()) + 1)[ordinals] = True
        else:
            self._bits(shard, 0)
        self._parts.setdefault(shard, []).append(part)

    def add_end(self, shard: str, count: int) -> None:
        self._expected[shard] = int(count)
        self._bits(shard, int(count))

    def complete(self, shard: str) -> bool:
        expected = self._expected.get(shard)
        return expected is not None and bool(self._seen[shard][:expected].all())

    def pop(self, shard: str) -> tuple[list[str], int]:
        """(parts, expected images) of a complete shard; forgets it."""
        expected = self._expected.pop(shard)
        self._seen.pop(shard, None)
        return self._parts.pop(shard, []), expected


class OutputLocked(RuntimeError):
    """Another job is writing to the same output."""


@dataclass
class _LockInfo:
    run_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> _LockInfo:
        return cls(**json.loads(data))


class WriterLock:
    """Single-writer lock on an output URI, kept alive by a heartbeat thread.

    A lock whose heartbeat is older than ``stale_after_s`` (its job was killed), or whose
    process is gone on this host, is taken over with a warning; a live one makes
    :meth:`acquire` raise :class:`OutputLocked`.
    """

    def __init__(self, uri: str, *, stale_after_s: float = 300.0, heartbeat_s: float = 30.0,
                 run_id: str | None = None):
        self.uri = uri
        self.fs, path = get_filesystem(uri)
        self.path = f"{path.rstrip('/')}/{LOCK_NAME}"
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        now = time.time()
        self.info = _LockInfo(run_id or uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(),
                              now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _read(self) -> _LockInfo | None:
        try:
            return _LockInfo.from_bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            return _LockInfo("unreadable", "?", -1, 0.0, 0.0)  # garbage: treat as stale

    def _is_stale(self, other: _LockInfo) -> bool:
        if time.time() - other.heartbeat_at > self.stale_after_s:
            return True
        if other.host == self.info.host and other.pid > 0 and other.pid != os.getpid():
            try:
                os.kill(other.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def acquire(self) -> WriterLock:
        for _ in range(3):
            self.info.heartbeat_at = time.time()
            if _exclusive_create(self.fs, self.path, self.info.to_bytes()):
                self._start_heartbeat()
                return self
            other = self._read()
            if other is None:
                continue
            if not self._is_stale(other):
                age = time.time() - other.started_at
                raise OutputLocked(
                    f"another panoray job (run {other.run_id}, host {other.host}, pid "
                    f"{other.pid}, started {age:.0f} s ago) is writing to {self.uri}; wait for "
                    f"it to finish, or if it was killed, re-run after its lock goes stale "
                    f"({self.stale_after_s:.0f} s without a heartbeat)"
                )
            log.warning("taking over the stale lock of run %s on %s (last heartbeat %.0f s ago)",
                        other.run_id, self.uri, time.time() - other.heartbeat_at)
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
        raise OutputLocked(f"could not take the lock on {self.uri}: another job keeps taking it")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="panoray-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self._read()
            if current is None or current.run_id != self.info.run_id:
                self.lost = True
                log.error("lost the output lock on %s to run %s", self.uri,
                          current.run_id if current else "?")
                return
            self.info.heartbeat_at = time.time()
            try:
                self.fs.pipe_file(self.path, self.info.to_bytes())
            except OSError as e:  # a transient storage error: try again next beat
                log.warning("lock heartbeat failed: %s", e)

    def ensure_held(self) -> None:
        """Raise if another job took the lock over (this job must stop committing)."""
        if self.lost:
            raise OutputLocked(f"this job lost the lock on {self.uri} to another job; stopping")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current.run_id == self.info.run_id:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
