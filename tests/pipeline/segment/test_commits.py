"""Shard commits are atomic and idempotent; the writer lock admits one job at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.segment.commits import (
    OutputLocked,
    OutputStore,
    ShardProgress,
    WriterLock,
    shard_key,
)


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


SCHEMA = pa.schema([("image_id", pa.string()), ("shard", pa.string())])


def _rows(shard: str, ordinals) -> pa.Table:
    return pa.table({"image_id": [f"{shard}/{i}" for i in ordinals],
                     "shard": [shard] * len(ordinals)}, schema=SCHEMA)


def test_parts_commit_once_with_one_row_per_image_and_vanish(out_uri):
    store = OutputStore(out_uri)
    # Three parts, one of them a retried task's duplicate of another.
    parts = [store.stage_part("run1", "s/a.tar", _rows("a", [2, 0])),
             store.stage_part("run1", "s/a.tar", _rows("a", [1])),
             store.stage_part("run1", "s/a.tar", _rows("a", [1]))]
    assert len(set(parts)) == 3  # attempt-unique names: nothing overwritten
    assert store.committed_keys() == set()  # parts are invisible to readers of data/
    table = store.commit_parts("s/a.tar", parts, expected=3, schema=SCHEMA)
    assert table.column("image_id").to_pylist() == ["a/0", "a/1", "a/2"]
    assert store.committed_keys() == {shard_key("s/a.tar")}
    with store.fs.open(f"{store.data_path}/{shard_key('s/a.tar')}.parquet") as f:
        assert pq.read_table(f).num_rows == 3
    assert not any(store.fs.exists(p) for p in parts)


def test_a_commit_sent_again_after_it_finished_returns_the_same_rows(out_uri):
    # A committer lost after it wrote the shard's file: the coordinator sends the commit again.
    store = OutputStore(out_uri)
    parts = [store.stage_part("run1", "s/r.tar", _rows("r", [0, 1]))]
    first = store.commit_parts("s/r.tar", parts, expected=2, schema=SCHEMA)
    again = store.commit_parts("s/r.tar", parts, expected=2, schema=SCHEMA)
    assert again.equals(first)
    # Without a committed file, a missing part is still an error.
    with pytest.raises(FileNotFoundError):
        store.commit_parts("s/never.tar", parts, expected=2, schema=SCHEMA)


def test_a_shard_missing_a_part_is_refused_not_committed_short(out_uri):
    store = OutputStore(out_uri)
    parts = [store.stage_part("run1", "s/b.tar", _rows("b", [0, 1]))]
    with pytest.raises(RuntimeError, match="2 of 3 images"):
        store.commit_parts("s/b.tar", parts, expected=3, schema=SCHEMA)
    assert store.committed_keys() == set()


def test_a_shard_without_images_commits_an_empty_file(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    assert store.commit_parts("s/empty.tar", [], expected=0, schema=SCHEMA).num_rows == 0
    assert store.committed_keys() == {shard_key("s/empty.tar")}


def test_clear_staging_removes_parts_of_other_runs_only(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    old = store.stage_part("killed", "s/a.tar", _rows("a", [0]))
    mine = store.stage_part("current", "s/a.tar", _rows("a", [0]))
    assert store.clear_staging(keep_run="current") == 1
    assert not store.fs.exists(old) and store.fs.exists(mine)


def test_shard_progress_completes_on_every_ordinal_whatever_the_order():
    progress = ShardProgress()
    progress.add_part("a", "p1", np.array([3, 1]))
    assert not progress.complete("a")  # no end marker yet
    progress.add_end("a", 4)
    progress.add_part("a", "p2", np.array([1]))  # a duplicate adds nothing
    assert not progress.complete("a")  # 0 and 2 missing
    progress.add_part("a", "p3", np.array([0, 2]))
    assert progress.complete("a")
    assert progress.pop("a") == (["p1", "p2", "p3"], 4)
    assert progress.pending == 0
    progress.add_end("empty", 0)
    assert progress.complete("empty")
    progress.add_part("big", "p", np.arange(1000))  # grows past its first allocation
    progress.add_end("big", 1001)
    assert not progress.complete("big")
    progress.add_part("big", "q", np.array([1000]))
    assert progress.complete("big")
