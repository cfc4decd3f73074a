"""Shard commits are atomic and idempotent; the writer lock admits one job at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.segment.commits import OutputLocked, OutputStore, WriterLock, shard_key


def _table(n: int, shard: str) -> pa.Table:
    return pa.table({"image_id": [f"{shard}/{i}" for i in range(n)], "shard": [shard] * n})


@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


def test_shard_keys_are_stable_safe_and_distinct():
    a, b = shard_key("imgs/part 1.tar"), shard_key("imgs/part:1.tar")
    assert a == shard_key("imgs/part 1.tar")
    assert a != b
    assert all(c.isalnum() or c in "._-" for c in a + b)


def test_recommitting_a_shard_replaces_it(out_uri):
    store = OutputStore(out_uri)
    assert store.committed_keys() == set()
    store.commit_shard("s/a.tar", _table(3, "a"))
    store.commit_shard("s/b.tar", _table(2, "b"))
    store.commit_shard("s/a.tar", _table(3, "a"))
    assert store.committed_keys() == {shard_key("s/a.tar"), shard_key("s/b.tar")}
    assert store.is_committed("s/a.tar") and not store.is_committed("s/c.tar")
    fs, path = store.fs, store.data_path
    rows = sum(pq.read_table(fs.open(p)).num_rows for p in fs.ls(path, detail=False))
    assert rows == 5


def test_second_writer_is_refused_with_a_clear_message(out_uri):
    with WriterLock(out_uri, heartbeat_s=0.2):
        with pytest.raises(OutputLocked, match="another panoray job .* is writing to"):
            WriterLock(out_uri).acquire()
    # released: a new job may write
    with WriterLock(out_uri):
        pass


def test_stale_lock_of_a_killed_job_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    # a job on this host whose process is gone
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (tmp_path / "out").mkdir()
    now = time.time()
    (tmp_path / "out" / "_panoray.lock").write_text(json.dumps(
        {"run_id": "dead", "host": "elsewhere", "pid": child.pid, "started_at": now - 100,
         "heartbeat_at": now - 100}))
    with pytest.raises(OutputLocked):
        WriterLock(out, stale_after_s=1000).acquire()
    with WriterLock(out, stale_after_s=10) as lock:
        assert json.loads((tmp_path / "out" / "_panoray.lock").read_text())["run_id"] == (
            lock.info.run_id)


def test_a_lock_taken_over_is_noticed_by_its_old_holder(tmp_path):
    out = str(tmp_path / "out")
    lock = WriterLock(out, heartbeat_s=0.05).acquire()
    (tmp_path / "out" / "_panoray.lock").write_text(json.dumps(
        {"run_id": "other", "host": "h", "pid": 1, "started_at": 0, "heartbeat_at": time.time()}))
    deadline = time.time() + 10
    while not lock.lost and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(OutputLocked, match="lost the lock"):
        lock.ensure_held()
    lock.release()
    assert json.loads((tmp_path / "out" / "_panoray.lock").read_text())["run_id"] == "other"
