"""Exactly once through failures: a SIGKILLed driver, and a worker node lost mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from segment_helpers import read_output, tiny_bundle, write_images

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    env.pop("RAY_ADDRESS", None)
    return env


def _committed(dst: Path) -> int:
    data = dst / "data"
    return len(list(data.glob("*.parquet"))) if data.exists() else 0


def _segment_cmd(src, dst, bundle) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "segment", str(src), str(dst), "--model", bundle,
            "--files-per-shard", "2", "--batch-size", "2", "--no-progress"]


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_gives_each_input_once(tmp_path):
    bundle = tiny_bundle(str(tmp_path / "bundle"))
    src, dst = tmp_path / "in", tmp_path / "out"
    names = [f"d{i // 2}/img{i:02d}.jpg" for i in range(24)]  # 12 folders -> 12+ shards
    for name in names:
        write_images(src / Path(name).parent, [Path(name).name], seed=names.index(name))
    first = subprocess.Popen(_segment_cmd(src, dst, bundle), env=_env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _committed(dst) == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        # the driver is gone; clear the local Ray it had started
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done_before = _committed(dst)
    assert 0 < done_before
    partial = read_output(str(dst)).num_rows
    assert partial < len(names), "kill came too late to test anything"

    rerun = subprocess.run(_segment_cmd(src, dst, bundle), env=_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already done" in rerun.stdout
    ids = read_output(str(dst)).column("image_id").to_pylist()
    assert sorted(ids) == sorted(names)  # every input once: nothing lost, nothing twice


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["node", "actor"])
def test_a_node_or_the_predictor_actor_lost_mid_shard_still_gives_each_input_once(tmp_path,
                                                                                   mode):
    import json

    bundle = tiny_bundle(str(tmp_path / "bundle"))
    src, dst = tmp_path / "in", tmp_path / "out"
    names = [f"d{i // 2}/img{i:02d}.jpg" for i in range(16)]
    for i, name in enumerate(names):
        write_images(src / Path(name).parent, [Path(name).name], seed=i)
    report_file = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(HERE / "multinode_segment.py"), str(src), str(dst),
                          bundle, str(report_file), mode], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert "at" in report["killed"], f"no {mode} was killed: {report['killed']}"
    assert report["killed"]["committed_before"] < 8, "the kill came after the job's end"
    ids = read_output(str(dst)).column("image_id").to_pylist()
    assert sorted(ids) == sorted(names)  # every input once: nothing lost, nothing twice
    assert not list((dst / "_staging").rglob("*.parquet"))  # no part left behind
