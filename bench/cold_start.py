"""Cold start of the segment job on a big archive of loose files, mostly done already.

Builds (once, cached) an archive of ``--files`` small JPEGs in nested folders like a camera
archive (``cam03/2024-05-17/IMG_012345.jpg``), groups it with ``list_shards`` and commits
``--committed`` of its shards directly with ``OutputStore.commit_shard`` (valid output rows
with the right ``image_id``s, no model), spread evenly over the archive. Then it times
``run_segment`` with a stand-in predictor (``bench/cold_start_standin.py``: empty maps, no
torch) from its call until the first NEW shard file appears in ``DST/data`` (a watcher thread), and
until it returns. Beside it, measured on their own: the listing (``list_shards``) and the skip
(committed keys, regrouped-file bookkeeping, the pending filter).

Two runs: ``cold`` starts Ray inside the job (a fresh local instance on 127.0.0.1, as the
embedded default does), ``warm`` reuses it (the output reset to the same 99 % in between).

Run: ``python bench/cold_start.py [--files 100000] [--committed 0.99] [--root DIR]``
(``--s3 N``: also the listing and skip of N objects on a moto S3 server on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import socket
import sys
import threading
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray workers import the stand-in predictor as bench.cold_start_standin: the repo root must be
# on their path, which they inherit from this environment (set before Ray starts).
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from bench.cold_start_standin import StandIn  # noqa: E402
from pipeline.segment import job as job_module  # noqa: E402
from pipeline.segment.commits import OutputStore, shard_key  # noqa: E402
from pipeline.segment.schema import OUTPUT_SCHEMA  # noqa: E402
from pipeline.segment.sources import list_shards  # noqa: E402

FILES_PER_SHARD = 256


def _jpeg(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 140, 200)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _layout(n: int) -> list[str]:
    """Relative paths of a camera archive: 8 cameras, a folder per day, 500 photos a day."""
    names = []
    for i in range(n):
        cam, day = i % 8, (i // 8) // 500
        names.append(f"cam{cam:02d}/2024-{1 + day // 28:02d}-{1 + day % 28:02d}/IMG_{i:06d}.jpg")
    return names


def build_archive(src: str, n: int) -> None:
    ready = f"{src}.ready-{n}"
    if os.path.exists(ready):
        return
    shutil.rmtree(src, ignore_errors=True)
    data = _jpeg()
    t = time.perf_counter()
    made: set[str] = set()
    for rel in _layout(n):
        folder = os.path.join(src, os.path.dirname(rel))
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        with open(os.path.join(src, rel), "wb") as f:
            f.write(data)
    open(ready, "w").close()
    print(f"built {n} files under {src} in {time.perf_counter() - t:.1f} s")


def _rows(shard, src: str) -> pa.Table:
    n = len(shard.members)
    now = datetime.now(timezone.utc)
    return pa.Table.from_pydict({
        "image_id": list(shard.members),
        "image_uri": [f"{src}/{m}" for m in shard.members],
        "shard": [shard.id] * n,
        "width": [16] * n, "height": [16] * n,
        "status": ["ok"] * n, "error": [None] * n,
        "panoptic_png": [b""] * n, "segments_info": [[]] * n,
        "model_id": ["standin"] * n, "processed_at": [now] * n,
    }, schema=OUTPUT_SCHEMA)


def precommit(src: str, dst: str, fraction: float) -> tuple[set[str], int]:
    """Commit `fraction` of the shards (evenly spread); returns their keys and the pending
    count."""
    shutil.rmtree(dst, ignore_errors=True)
    shards = list_shards(src, files_per_shard=FILES_PER_SHARD)
    n_pending = max(1, round(len(shards) * (1 - fraction)))
    pending = {int(k * len(shards) / n_pending) for k in range(n_pending)}
    store = OutputStore(dst)
    keys = set()
    for i, shard in enumerate(shards):
        if i not in pending:
            store.commit_shard(shard.id, _rows(shard, src))
            keys.add(shard_key(shard.id))
    return keys, len(pending)


def reset_output(dst: str, keys: set[str]) -> None:
    data = os.path.join(dst, "data")
    for name in os.listdir(data):
        if name[: -len(".parquet")] not in keys:
            os.remove(os.path.join(data, name))


def time_listing_and_skip(src: str, dst: str) -> tuple[float, float, int, int]:
    t = time.perf_counter()
    shards = list_shards(src, files_per_shard=FILES_PER_SHARD)
    listing = time.perf_counter() - t
    t = time.perf_counter()
    store = OutputStore(dst)
    done = store.committed_keys()
    job_module.RegroupedFiles(store, shards, done)
    pending = [s for s in shards if shard_key(s.id) not in done]
    skip = time.perf_counter() - t
    return listing, skip, len(shards), len(pending)


class FirstCommit(threading.Thread):
    """Watches DST/data for the first shard file not committed before the run."""

    def __init__(self, dst: str, before: set[str], t0: float):
        super().__init__(daemon=True)
        self.data, self.before, self.t0 = os.path.join(dst, "data"), before, t0
        self.at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with os.scandir(self.data) as it:
                for e in it:
                    if (e.name.endswith(".parquet") and ".tmp-" not in e.name
                            and e.name[: -len(".parquet")] not in self.before):
                        self.at = time.perf_counter() - self.t0
                        return
            time.sleep(0.02)


class PendingKnown(logging.Handler):
    """Time of the job's 'N shards at ...: M already committed' log line."""

    def __init__(self, t0: float):
        super().__init__(logging.INFO)
        self.t0, self.at = t0, None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and "already committed" in record.getMessage():
            self.at = time.perf_counter() - self.t0


RAY_START: list[float] = []


def _start_ray_local(address=None) -> None:
    import ray

    t = time.perf_counter()
    if not ray.is_initialized():  # a fresh instance on loopback, never someone else's cluster
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _node_ip_address="127.0.0.1")
    RAY_START.append(time.perf_counter() - t)


def timed_run(src: str, dst: str, keys: set[str]) -> dict[str, float | None]:
    t0 = time.perf_counter()
    watcher = FirstCommit(dst, keys, t0)
    known = PendingKnown(t0)
    log = logging.getLogger("pipeline.segment.job")
    log.addHandler(known)
    log.setLevel(logging.INFO)
    watcher.start()
    try:
        summary = job_module.run_segment(src=src, dst=dst, model="standin", predictor=StandIn,
                                         files_per_shard=FILES_PER_SHARD, progress=False)
    finally:
        total = time.perf_counter() - t0
        watcher.stop.set()
        log.removeHandler(known)
    return {"pending_known": known.at, "ray_start": RAY_START[-1] if RAY_START else None,
            "first_commit": watcher.at, "total": total,
            "done": summary.shards_done, "skipped": summary.shards_skipped}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_listing(n: int, fraction: float) -> None:
    """Listing and skip of `n` loose objects (and their committed shards) on moto S3."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "AWS_ENDPOINT_URL_S3": endpoint})
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="archive")
        data = _jpeg()
        t = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda rel: client.put_object(Bucket="archive", Key=f"src/{rel}",
                                                        Body=data), _layout(n)))
        print(f"s3: uploaded {n} objects in {time.perf_counter() - t:.1f} s")
        src, dst = "s3://archive/src", "s3://archive/dst"
        shards = list_shards(src, files_per_shard=FILES_PER_SHARD)
        n_pending = max(1, round(len(shards) * (1 - fraction)))
        pending = {int(k * len(shards) / n_pending) for k in range(n_pending)}
        store = OutputStore(dst)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda s: store.commit_shard(s.id, _rows(s, src)),
                          [s for i, s in enumerate(shards) if i not in pending]))
        listing, skip, total, todo = time_listing_and_skip(src, dst)
        print(f"s3: {total} shards, {todo} pending: listing {listing:.2f} s, skip {skip:.2f} s")
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--committed", type=float, default=0.99)
    ap.add_argument("--root", default="/tmp/panoray-cold-start")
    ap.add_argument("--s3", type=int, default=0, help="also list N objects on moto S3")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src, dst = os.path.join(args.root, "src"), os.path.join(args.root, "dst")
    build_archive(src, args.files)
    t = time.perf_counter()
    keys, n_pending = precommit(src, dst, args.committed)
    print(f"pre-committed {len(keys)} shards ({n_pending} left) in "
          f"{time.perf_counter() - t:.1f} s")
    listing, skip, total, todo = time_listing_and_skip(src, dst)
    print(f"{total} shards, {todo} pending")
    job_module._ensure_ray = _start_ray_local
    results = {}
    for name in ("cold", "warm"):
        results[name] = timed_run(src, dst, keys)
        reset_output(dst, keys)
    print(f"\n{args.files} loose files, {100 * args.committed:g} % of {total} shards committed")
    print(f"listing (list_shards alone): {listing:6.2f} s")
    print(f"skip (keys + regrouped + filter): {skip:6.2f} s")
    print(f"{'run':6} {'pending known s':>16} {'ray start s':>12} {'first commit s':>15} "
          f"{'total s':>8}  shards")
    for name, r in results.items():
        cells = ["-" if r[k] is None else f"{r[k]:.2f}"
                 for k in ("pending_known", "ray_start", "first_commit")]
        print(f"{name:6} {cells[0]:>16} {cells[1]:>12} {cells[2]:>15} {r['total']:8.2f}  "
              f"{r['done']} done, {r['skipped']} skipped")
    if args.s3:
        s3_listing(args.s3, args.committed)


if __name__ == "__main__":
    main()
