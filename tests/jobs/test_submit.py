"""`panoray submit` runs a job spec on a real Ray head started on loopback by the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "pipeline"))

from segment_helpers import read_output, tiny_bundle, write_images  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` on 127.0.0.1; yields the dashboard URL; `ray stop` after."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    dash = _port()
    start = subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         "--num-cpus=2", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_submit_runs_a_segment_spec_on_the_cluster(tmp_path, ray_head):
    bundle = tiny_bundle(str(tmp_path / "bundle"))
    write_images(tmp_path / "in", ["a.jpg", "b.jpg"])
    spec = tmp_path / "segment.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "segment", "src": str(tmp_path / "in"), "dst": str(tmp_path / "out"),
        "model": bundle, "batch_size": 2,
        "runtime_env": {"env_vars": {"PANORAY_TEST_MARKER": "1"}}}))
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", str(spec), "--address",
                          ray_head, "--wait"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "SUCCEEDED" in run.stdout
    table = read_output(str(tmp_path / "out"))
    assert sorted(table.column("image_id").to_pylist()) == ["a.jpg", "b.jpg"]


def test_submit_rejects_a_bad_spec_before_contacting_anything(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("kind: segment\nsrc: a\ndst: b\nmodel: m\nbatchsize: 3\n")
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", str(spec), "--address",
                          "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert "unknown key 'batchsize'" in run.stderr and "Traceback" not in run.stderr
