"""The segment job end to end on a local Ray: one row per input, exactly once, re-runs safe."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from bad_inputs import EXIF_UPRIGHT_SIZE, make_bad_inputs
from segment_helpers import image_bytes, read_output, tar_shard, tiny_bundle, write_images

from model.bundle import read_bundle_config
from pipeline.segment.commits import OutputLocked, WriterLock
from pipeline.segment.job import run_segment
from pipeline.segment.schema import validate_rows


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return tiny_bundle(str(tmp_path_factory.mktemp("bundle") / "tiny"))


def test_local_folder_with_bad_inputs_then_incremental_rerun(tmp_path, bundle, ray_local):
    src, dst = tmp_path / "in", str(tmp_path / "out")
    write_images(src / "a", [f"img{i}.jpg" for i in range(3)])
    expected = make_bad_inputs(src / "b")
    summary = run_segment(src=str(src), dst=dst, model=bundle, files_per_shard=4,
                          progress=False)
    table = read_output(dst)
    assert validate_rows(table) == []
    rows = {r["image_id"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}
    assert len(table) == 3 + len(expected) == summary.images_ok + summary.images_failed
    for name, status in expected.items():
        assert rows[name]["status"] == status, (name, rows[name]["error"])
    assert (rows["exif_rotated.jpg"]["width"], rows["exif_rotated.jpg"]["height"]) == (
        EXIF_UPRIGHT_SIZE)
    assert "too large" in rows["bomb.png"]["error"]
    assert {r["model_id"] for r in table.to_pylist()} == {json.loads(
        Path(bundle, "config.json").read_text())["name"] + "@" + rows["img0.jpg"]["model_id"]
        .split("@")[1]}

    again = run_segment(src=str(src), dst=dst, model=bundle, files_per_shard=4, progress=False)
    assert again.shards_done == 0 and again.shards_skipped == summary.shards_done

    write_images(src / "c", ["new0.png", "new1.png"], seed=50)
    later = run_segment(src=str(src), dst=dst, model=bundle, files_per_shard=4, progress=False)
    assert later.images_ok + later.images_failed == 2
    final = read_output(dst)
    ids = final.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 3 + len(expected) + 2


def test_a_committer_lost_after_its_commit_is_replaced_and_nothing_doubles(tmp_path, bundle,
                                                                           ray_local,
                                                                           monkeypatch):
    import ray

    from pipeline.segment import job
    from pipeline.segment.commits import Committer

    marker = tmp_path / "crashed"

    class DiesOnceAfterCommitting(Committer):  # a committer whose node goes away mid-job
        def commit(self, *args):
            counts = super().commit(*args)
            if not marker.exists():
                marker.write_text("x")
                os._exit(1)  # the shard's file is written, its parts removed; no answer
            return counts

    monkeypatch.setattr(job, "_Committer", ray.remote(num_cpus=0, max_restarts=0)(
        DiesOnceAfterCommitting))
    src, dst = tmp_path / "in", str(tmp_path / "out")
    names = [f"d{i // 2}/img{i}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        write_images(src / Path(name).parent, [Path(name).name], seed=i)
    summary = run_segment(src=str(src), dst=dst, model=bundle, files_per_shard=2,
                          progress=False)
    assert marker.exists()
    assert (summary.images_ok, summary.images_failed) == (6, 0)
    assert summary.shards_done == len(list(Path(dst, "data").glob("*.parquet")))
    assert sorted(read_output(dst).column("image_id").to_pylist()) == sorted(names)
    assert not list(Path(dst, "_staging").rglob("*.parquet"))


def test_output_inside_the_input_is_never_read_back(tmp_path, bundle, ray_local):
    src = tmp_path / "photos"
    write_images(src, ["a.jpg", "b.jpg", "_DSC0001.JPG"])
    (src / ".DS_Store").write_bytes(b"x")
    (src / "notes.txt").write_text("hello")
    dst = str(src / "segments")
    for _ in range(3):  # each run reads only the photos, never its own Parquet and PNGs
        summary = run_segment(src=str(src), dst=dst, model=bundle, progress=False)
        ids = read_output(dst).column("image_id").to_pylist()
        assert sorted(ids) == ["_DSC0001.JPG", "a.jpg", "b.jpg"]
    assert summary.skipped.counts == {"hidden": 1, "not an image": 1, "panoray output": 1}
    assert "3 skipped" in summary.render()
    with pytest.raises(ValueError, match="input folder itself"):
        run_segment(src=str(src), dst=str(src), model=bundle, progress=False)


def test_regrouped_files_leave_one_row_per_image(tmp_path, bundle, ray_local):
    src, dst = tmp_path / "in", str(tmp_path / "out")
    names = [f"img{i:03d}.jpg" for i in range(24)]
    for i, name in enumerate(names):
        write_images(src, [name], seed=i)
    first = run_segment(src=str(src), dst=dst, model=bundle, files_per_shard=3, progress=False)
    assert first.images_ok == 24 and first.shards_done > 4
    # Every file changes shard: the new shards' rows replace the old shards' rows.
    again = run_segment(src=str(src), dst=dst, model=bundle, files_per_shard=24,
                        progress=False)
    assert again.shards_done < first.shards_done
    ids = read_output(dst).column("image_id").to_pylist()
    assert sorted(ids) == names  # no duplicate, none missing


def test_tar_shards_on_s3_to_parquet_on_s3(tmp_path, bundle, s3_bucket, s3_server, ray_local):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for shard in range(2):
        members = {f"k{shard}_{i}.jpg": image_bytes(10 * shard + i) for i in range(3)}
        members[f"k{shard}_0.json"] = b"{}"  # WebDataset side files are not inputs
        s3.put_object(Bucket=s3_bucket, Key=f"in/part-{shard}.tar", Body=tar_shard(members))
    dst = f"s3://{s3_bucket}/out"
    summary = run_segment(src=f"s3://{s3_bucket}/in", dst=dst, model=bundle, progress=False)
    assert (summary.shards_done, summary.images_ok, summary.images_failed) == (2, 6, 0)
    table = read_output(dst)
    assert validate_rows(table) == []
    assert sorted(table.column("image_id").to_pylist()) == sorted(
        f"part-{s}.tar/k{s}_{i}" for s in range(2) for i in range(3))
    assert all(u.startswith(f"s3://{s3_bucket}/in/part-") for u in
               table.column("image_uri").to_pylist())
    # nothing of the credentials leaks into the rows
    text = json.dumps(table.drop(["panoptic_png"]).to_pylist(), default=str)
    assert "testing-secret" not in text

    # the scheduled re-run after a new shard arrived does that shard only
    s3.put_object(Bucket=s3_bucket, Key="in/part-2.tar",
                  Body=tar_shard({"k2_0.jpg": image_bytes(99)}))
    later = run_segment(src=f"s3://{s3_bucket}/in", dst=dst, model=bundle, progress=False)
    assert (later.shards_done, later.shards_skipped, later.images_ok) == (1, 2, 1)
    assert read_output(dst).num_rows == 7


def test_a_bundle_named_by_an_endpoint_query(tmp_path, s3_bucket, s3_server, ray_local,
                                             monkeypatch):
    uri = tiny_bundle(f"s3://{s3_bucket}/models/tiny?endpoint={s3_server}")
    # The driver's default endpoint is a closed loopback port: only the query reaches the bundle.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    src, dst = tmp_path / "in", str(tmp_path / "out")
    write_images(src, ["x.jpg"])
    summary = run_segment(src=str(src), dst=dst, model=uri, progress=False)
    assert (summary.images_ok, summary.images_failed) == (1, 0)
    assert read_output(dst).column("model_id").to_pylist() == [read_bundle_config(uri).model_id]


def test_output_reads_back_without_panoray(tmp_path, bundle, ray_local):
    import duckdb
    import pandas as pd
    import polars as pl

    src, dst = tmp_path / "in", tmp_path / "out"
    write_images(src, ["x.jpg", "y.jpg"])
    (src / "broken.jpg").write_bytes(b"nope")
    run_segment(src=str(src), dst=str(dst), model=bundle, progress=False)
    files = str(dst / "data" / "*.parquet")
    frame = pd.concat(pd.read_parquet(p) for p in sorted((dst / "data").glob("*.parquet")))
    assert sorted(frame["status"]) == ["error", "ok", "ok"]
    lf = pl.read_parquet(files)
    assert lf.filter(pl.col("status") == "ok")["segments_info"].list.len().min() >= 0
    con = duckdb.connect()
    n_ok, n_err = con.execute(
        f"select count(*) filter (where status = 'ok'), count(*) filter (where status = 'error')"
        f" from read_parquet('{files}')").fetchone()
    assert (n_ok, n_err) == (2, 1)
    bboxes = con.execute(f"select s.bbox from read_parquet('{files}'), unnest(segments_info) t(s)"
                         ).fetchall()
    assert all(len(b[0]) == 4 for b in bboxes)


def test_a_second_job_on_the_same_output_is_refused(tmp_path, bundle):
    src, dst = tmp_path / "in", str(tmp_path / "out")
    write_images(src, ["x.jpg"])
    with WriterLock(dst):
        with pytest.raises(OutputLocked, match="another panoray job"):
            run_segment(src=str(src), dst=dst, model=bundle, progress=False)
    assert not (tmp_path / "out" / "data").exists()


def test_regrouped_loose_files_leave_no_duplicates(tmp_path):
    """A file added next to others changes its shard's id; the old shard's rows must go."""
    import pyarrow as pa

    from pipeline.segment.commits import OutputStore, shard_key
    from pipeline.segment.job import RegroupedFiles
    from pipeline.segment.sources import list_shards

    src = tmp_path / "in"
    write_images(src, [f"img{i:02d}.jpg" for i in range(0, 40, 2)])
    before = list_shards(str(src), files_per_shard=4)
    store = OutputStore(str(tmp_path / "out"))

    def commit(shard):
        ids = sorted(shard.members)
        store.commit_shard(shard.id, pa.table({"image_id": ids, "shard": [shard.id] * len(ids)}))

    for shard in before:
        commit(shard)
    # add one file that lands inside an existing shard (not at a boundary)
    for i in range(1, 40, 2):
        write_images(src, [f"img{i:02d}.jpg"], seed=100 + i)
        after = list_shards(str(src), files_per_shard=4)
        if len({s.id for s in before} - {s.id for s in after}) == 1:
            break
        (src / f"img{i:02d}.jpg").unlink()
    else:
        pytest.fail("no insertion changed exactly one shard")
    changed = [s for s in after if s.id not in {b.id for b in before}]
    committed = store.committed_keys()
    regrouped = RegroupedFiles(store, after, committed)
    for shard in changed:  # what the job does: commit the new shard, then clean up
        commit(shard)
        regrouped.after_commit(shard.id)
    ids = [i for key in store.committed_keys() for i in store.image_ids(key)]
    assert sorted(ids) == sorted(m for s in after for m in s.members)
    assert all(shard_key(s.id) in store.committed_keys() for s in after)


def test_io_workers_lower_their_priority_once_per_thread():
    """yield_cpu drops the calling thread's priority by the asked amount, the first time only;
    other threads (a predictor actor's predictor thread) keep theirs."""
    import subprocess
    import sys

    code = ("import os, threading; from pipeline.segment.rows import yield_cpu\n"
            "get = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())\n"
            "before = get(); yield_cpu(3); yield_cpu(3); main = get() - before\n"
            "seen = {}\n"
            "def other(): seen['untouched'] = get() - before\n"
            "def encoder(): yield_cpu(2); yield_cpu(2); seen['encoder'] = get() - before\n"
            "for f in (other, encoder):\n"
            "    t = threading.Thread(target=f); t.start(); t.join()\n"
            "print(main, seen['untouched'], seen['encoder'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[3])
    # a new thread starts at its creator's priority (3): only its own call lowers it further
    assert out.stdout.split() == ["3", "3", "5"]


def _segment_one_image_by_cli(tmp_path, bundle: str, prelude: str):
    """`panoray segment` of one photo in a fresh interpreter that first runs `prelude`; checks
    that it ended well with the photo's row, and returns the finished process."""
    src, dst = tmp_path / "in", tmp_path / "out"
    write_images(src, ["a.jpg"])
    code = (prelude + "import runpy, sys\n"
            f"sys.argv = ['panoray', 'segment', {str(src)!r}, {str(dst)!r}, '--model', "
            f"{bundle!r}]\n"
            "runpy.run_module('jobs.cli', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["status"] for r in read_output(str(dst)).to_pylist()] == ["ok"]
    return run


def test_the_driver_of_a_segment_job_never_imports_torch(tmp_path, bundle):
    """The driver names the default predictor and reads the bundle's config.json only: torch
    (seconds of start-up, hundreds of MB) is imported by the predictor actors alone."""
    run = _segment_one_image_by_cli(tmp_path, bundle, (
        "import atexit, sys\n"
        "atexit.register(lambda: print('driver imported torch:', 'torch' in sys.modules, "
        "file=sys.stderr))\n"))
    assert "driver imported torch: False" in run.stderr, run.stderr[-3000:]


def test_a_ctrl_c_while_the_cli_stops_its_ray_is_not_a_traceback(tmp_path, bundle):
    """A Ctrl-C just as a job ends lands while Ray's processes are being stopped; the CLI stops
    the Ray it started itself, with Ctrl-C held off (in Ray's atexit hook it was a traceback)."""
    run = _segment_one_image_by_cli(tmp_path, bundle, (
        "import os, signal, time\n"
        "from ray._private.node import Node\n"
        "real = Node.kill_all_processes\n"
        "def kill_all_processes(self, *a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, at the worst moment\n"
        "    time.sleep(0.2)\n"
        "    return real(self, *a, **k)\n"
        "Node.kill_all_processes = kill_all_processes\n"))
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr, \
        run.stderr[-3000:]


def test_cli_runs_a_users_own_predictor_class(tmp_path):
    from pipeline.coco.panoptic_io import decode_panoptic_png

    src, dst = tmp_path / "in", tmp_path / "out"
    write_images(src, ["a.jpg", "b.png"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "jobs.cli", "segment", str(src), str(dst), "--model",
           "any-uri-my-predictor-understands", "--predictor", "standin_predictor:Halves"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stderr[-3000:]
    # a healthy run is quiet: no WARNING or ERROR line, Ray's own (C++ "E" lines) included
    loud = [line for line in run.stderr.splitlines()
            if re.search(r"\b(WARNING|ERROR)\b|^\[[^\]]* [EW] \d+ \d+\]", line)]
    assert not loud, "\n".join(loud)
    # off a terminal the progress is the job's own line per shard, not Ray Data's log blocks
    assert "committed shard" in run.stderr
    assert "logging_progress" not in run.stderr and "Total Progress" not in run.stderr
    rows = read_output(str(dst)).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row in rows:
        ids = decode_panoptic_png(row["panoptic_png"])
        assert ids.shape == (row["height"], row["width"])
        assert set(np.unique(ids)) == {1, 2}
        assert [(s["id"], s["category_id"], s["isthing"]) for s in row["segments_info"]] == [
            (1, 7, False), (2, 3, True)]
        assert row["model_id"] == "halves@v1"


def test_a_job_on_a_cluster_with_gpus_runs_through(tmp_path):
    """On a cluster with GPUs (here a local Ray that says it has two, and two CPUs) the pool
    takes GPU actors by default, and the job runs through: Ray Data asks more of a
    GPU pool's map_batches than of a CPU one (an explicit batch size), so a job that works on
    CPUs only proved nothing about this path."""
    src, dst = tmp_path / "in", tmp_path / "out"
    write_images(src, [f"p{i}.jpg" for i in range(5)])
    script = (
        "import json, sys, ray\n"
        "from pipeline.segment.job import run_segment\n"
        "ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)\n"
        f"s = run_segment(src={str(src)!r}, dst={str(dst)!r}, model='any', progress=False,\n"
        "                predictor='standin_predictor:Halves')\n"
        "print('RESULT', json.dumps([s.images_ok, s.images_failed]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    # a healthy run takes ~20 s; the hang this also guards against (actors on every CPU) ends
    # at the timeout
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=150, cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RESULT [5, 0]" in run.stdout, run.stdout[-2000:]
    rows = read_output(str(dst)).to_pylist()
    assert sorted(r["image_id"] for r in rows) == [f"p{i}.jpg" for i in range(5)]
    assert {r["model_id"] for r in rows} == {"halves@v1"}


def test_every_cpu_actor_gets_work_in_a_small_job(tmp_path, ray_local):
    """Four shards, two CPU actors of which one is ready a second later: both answer calls.
    (Ray Data queued up to four calls on the actor that was ready first, and it did all
    four shards while the other one waited.)"""
    import standin_predictor
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(standin_predictor)  # the workers cannot import it
    src, calls = tmp_path / "in", tmp_path / "calls"
    calls.mkdir()
    write_images(src, [f"p{i}.jpg" for i in range(8)])
    summary = run_segment(src=str(src), dst=str(tmp_path / "out"), model=str(calls),
                          predictor=standin_predictor.Tally, files_per_shard=2, num_actors=2,
                          cpus_per_actor=0.5, threads_per_actor=1, progress=False)
    assert (summary.shards_done, summary.images_ok) == (4, 8)
    answered = {f.name: len(f.read_text().split()) for f in calls.glob("calls-*")}
    assert len(answered) == 2, answered
    assert sum(answered.values()) == 4


@pytest.mark.parametrize("spec, says", [("nocolon", "not package.module:Class"),
                                        ("no_such_module_xyz:C", "cannot import"),
                                        ("standin_predictor:Missing", "has no class Missing")])
def test_a_bad_predictor_name_is_one_sentence(tmp_path, spec, says):
    src = tmp_path / "in"
    write_images(src, ["a.jpg"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "segment", str(src),
                          str(tmp_path / "out"), "--model", "m", "--predictor", spec],
                         env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 2, run.stderr[-2000:]
    assert says in run.stderr and "Traceback" not in run.stderr
