"""`panoray submit` runs a job spec on a real Ray head started on loopback by the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from segment_helpers import read_output, tiny_bundle, write_images

REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1 with ports of its own; yields the dashboard URL.

    Its own ports keep it apart from any other local Ray (e.g. the session's `ray_local`),
    and it is stopped by ending its process group: `ray stop` would stop every Ray here.
    """
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    dash, gcs = _port(), _port()
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", f"--dashboard-agent-listen-port={_port()}",
         f"--dashboard-agent-grpc-port={_port()}", f"--runtime-env-agent-port={_port()}",
         f"--metrics-export-port={_port()}", f"--node-manager-port={_port()}",
         f"--object-manager-port={_port()}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers (401 with Ray's token auth): the dashboard is up
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # `ray start` left the address of this (now gone) head for ray.init() to find
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and f":{gcs}" in current.read_text():
            current.unlink()


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
