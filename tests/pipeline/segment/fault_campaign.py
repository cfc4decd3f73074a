"""A fault campaign for the segment job: seeded random trials over a small archive on S3.

Each trial runs `panoray segment` as a user does (a subprocess with its own local Ray) with a
fault-injecting proxy (tests/s3_fault_proxy.py) between the job and the moto S3 server, and at
random moments SIGKILLs the driver (the whole process group: its Ray goes with it) or the
predictor actor's process; then it runs the job again, faults still on, until it ends well. The
output must then equal a clean run's: the same image ids, none twice, the same status and the
same PNG bytes for every image.

Used by test_fault_campaign.py (one short trial in CI) and bench/faults.py (a longer campaign).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from s3_fault_proxy import FaultProxy

from model.storage import get_filesystem

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
RATES = {"slowdown": 0.03, "error": 0.03, "reset": 0.02, "reset_after": 0.02, "slow": 0.03}


def make_archive(uri: str, *, tars: int = 3, per_tar: int = 4, loose: int = 6) -> list[str]:
    """Tar shards and loose JPEGs under `uri` (written straight to the store); their ids."""
    from segment_helpers import image_bytes, tar_shard

    fs, root = get_filesystem(uri)
    ids = []
    for t in range(tars):
        members = {f"k{i}.jpg": image_bytes(100 * t + i) for i in range(per_tar)}
        fs.pipe_file(f"{root}/tars/part-{t}.tar", tar_shard(members))
        ids += [f"tars/part-{t}.tar/k{i}" for i in range(per_tar)]
    for i in range(loose):
        fs.pipe_file(f"{root}/loose/img{i:02d}.jpg", image_bytes(1000 + i))
        ids.append(f"loose/img{i:02d}.jpg")
    return sorted(ids)


def output_rows(uri: str) -> list[tuple[str, str, str]]:
    """(image_id, status, sha256 of the PNG) of every committed row, duplicates kept."""
    fs, root = get_filesystem(uri)
    try:
        files = sorted(p for p in fs.ls(f"{root}/data", detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []
    rows = []
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_id", "status", "panoptic_png"])
        for r in table.to_pylist():
            png = r["panoptic_png"]
            rows.append((r["image_id"], r["status"],
                         hashlib.sha256(png).hexdigest() if png else ""))
    return sorted(rows)


def committed(uri: str) -> int:
    fs, root = get_filesystem(uri)
    try:
        return sum(p.endswith(".parquet") for p in fs.ls(f"{root}/data", detail=False))
    except FileNotFoundError:
        return 0


def staged(uri: str) -> bool:
    """Whether any part is staged (the job is segmenting)."""
    fs, root = get_filesystem(uri)
    try:
        return any(p.endswith(".parquet") for p in fs.find(f"{root}/_staging"))
    except FileNotFoundError:
        return False


def env() -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), out.get("PYTHONPATH", "")])
    out.pop("RAY_ADDRESS", None)
    return out


def segment_cmd(src: str, dst: str, bundle: str, address: str | None = None) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "segment", src, dst, "--model", bundle,
            "--files-per-shard", "2", "--batch-size", "2", "--no-progress",
            *(["--address", address] if address else [])]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _kill_predictor() -> bool:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if "MapWorker(MapBatches(PredictStage))" in " ".join(p.info["cmdline"] or ()):
            p.kill()
            return True
    return False


@dataclass
class Trial:
    seed: int
    runs: int = 0
    driver_kills: int = 0
    actor_kills: int = 0
    faults: dict = field(default_factory=dict)
    rows: int = 0
    duplicates: int = 0
    missing: int = 0
    differing: int = 0  # rows whose status or PNG bytes differ from the clean run's
    seconds: float = 0.0
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.duplicates == self.missing == self.differing == 0 and self.rows > 0


def clean_run(src: str, dst: str, bundle: str) -> list[tuple]:
    """The reference: the job with no fault at all, the same settings as `segment_cmd`, run in
    this process (on whatever Ray it has: the tests' shared local one)."""
    from pipeline.segment.job import run_segment

    run_segment(src=src, dst=dst, model=bundle, files_per_shard=2, batch_size=2,
                progress=False)
    return output_rows(dst)


def trial(seed: int, *, src: str, dst: str, bundle: str, upstream: str, reference: list[tuple],
          shards: int, kill_driver: bool = True, kill_actor: bool = False,
          rates: dict | None = None, max_runs: int = 5, timeout: float = 600,
          address: str | None = None) -> Trial:
    """One seeded trial (src / dst: s3:// URIs without an endpoint; `upstream`: the S3 server
    the proxy forwards to). Kills happen after a random number of shards is committed.
    `address`: a running Ray cluster for the job's drivers (a killed driver takes its job's
    tasks and actors with it, the cluster stays); None: each run starts a Ray of its own."""
    rng = random.Random(seed)
    result = Trial(seed=seed)
    started = time.monotonic()
    with FaultProxy(upstream, seed=seed, slow_s=0.2, **(rates or RATES)) as proxy:
        via = f"?endpoint={proxy.url}"
        cmd = segment_cmd(src + via, dst + via, bundle, address)
        plan = []  # what to kill, in order, each after a random number of commits
        if kill_driver:
            plan.append("driver")
        if kill_actor:
            plan.append("actor")
        rng.shuffle(plan)
        while result.runs < max_runs:
            result.runs += 1
            log = Path(dst.replace("/", "_") + f".{result.runs}.log").name
            log_path = Path(os.environ.get("TMPDIR", "/tmp")) / log
            with open(log_path, "w") as out:
                proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    while plan and proc.poll() is None:
                        # After 0..shards/2 more commits; "0": once the first part is staged.
                        more = rng.randint(0, max(0, shards // 2))
                        target = committed(dst) + more
                        while proc.poll() is None and (
                                committed(dst) < target if more else not staged(dst)):
                            time.sleep(0.1)
                        time.sleep(rng.uniform(0, 0.3))
                        if proc.poll() is not None:
                            break
                        what = plan.pop(0)
                        if what == "driver":
                            _kill_group(proc)
                            result.driver_kills += 1
                        elif _kill_predictor():
                            result.actor_kills += 1
                    if proc.wait(timeout=timeout) == 0:
                        plan.clear()  # a kill still planned came too late: the job had ended
                finally:
                    if proc.poll() is None:
                        _kill_group(proc)
                    else:
                        _kill_group(proc)  # the driver's Ray, if the driver was killed
            result.log_tail = log_path.read_text()[-3000:]
            if proc.returncode == 0:
                break
        result.faults = {k: v for k, v in proxy.counts.items() if k != "forwarded" and v}
    rows = output_rows(dst)
    ids = [r[0] for r in rows]
    expected = {r[0]: r for r in reference}
    result.rows = len(rows)
    result.duplicates = len(ids) - len(set(ids))
    result.missing = len(set(expected) - set(ids))
    result.differing = sum(1 for r in set(rows) if expected.get(r[0]) != r)
    result.seconds = time.monotonic() - started
    return result
