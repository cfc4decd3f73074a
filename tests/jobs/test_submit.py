"""`panoray submit` runs a job spec on a real Ray head started on loopback by the test (slow);
the paths of a spec, `--wait`'s log streaming and `panoray logs` also against a fake Jobs
client (fast)."""

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


def _panoray(*argv: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _printed_command(stdout: str, before: str) -> list[str]:
    """The `panoray ...` command that a line of `stdout` starting with `before` names."""
    line = next(line for line in stdout.splitlines() if line.startswith(before))
    words = line[len(before):].strip().rstrip("):").split()
    assert words[0] == "panoray", line
    return words[1:]


@pytest.mark.slow
def test_submit_runs_a_segment_spec_on_the_cluster(tmp_path, ray_head):
    """One cluster for all of it: a spec with relative paths submitted to a cluster on this
    machine (made absolute), --wait streaming the log to the summary, the printed follow-up
    commands run as printed (Ray 2.60's token auth: `ray job logs` alone would fail), a failing
    job's last error line, an unknown job id."""
    tiny_bundle(str(tmp_path / "bundle"))
    write_images(tmp_path / "in", ["a.jpg", "b.jpg"])
    spec = tmp_path / "segment.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "segment", "src": "in", "dst": "out", "model": "bundle", "batch_size": 2,
        "runtime_env": {"env_vars": {"PANORAY_TEST_MARKER": "1"}}}))
    run = _panoray("submit", "segment.yaml", "--address", ray_head, "--wait", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "SUCCEEDED" in run.stdout
    assert "committed shard" in run.stdout  # the job's log, streamed
    assert "  images: 2 ok, 0 failed" in run.stdout  # its summary, after the status
    table = read_output(str(tmp_path / "out"))
    assert sorted(table.column("image_id").to_pylist()) == ["a.jpg", "b.jpg"]

    logs = _panoray(*_printed_command(run.stdout, "its log (also later:"), timeout=120)
    assert logs.returncode == 0, logs.stdout[-2000:] + logs.stderr[-2000:]
    assert "committed shard" in logs.stdout and "SUCCEEDED" in logs.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kind": "segment", "src": str(tmp_path / "nowhere"),
                                   "dst": str(tmp_path / "out2"), "model": "bundle"}))
    run = _panoray("submit", str(bad), "--address", ray_head, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    follow = _panoray(*_printed_command(run.stdout, "follow it with:"), timeout=300)
    assert follow.returncode == 1, follow.stdout[-2000:] + follow.stderr[-2000:]
    assert "panoray segment: error:" in follow.stdout  # the job's own log
    last = follow.stderr.strip().splitlines()[-1]
    assert last.startswith("panoray logs: job raysubmit_") and " FAILED: " in last, last
    assert "nowhere" in last and "error:" not in last, last

    unknown = _panoray("logs", "raysubmit_nosuchjob0000", "--address", ray_head, timeout=120)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().count("\n") == 0, unknown.stderr
    assert "has no job 'raysubmit_nosuchjob0000'" in unknown.stderr

    # without the token (what a bare `ray job logs` sends): refused, and one sentence says why
    no_token = _panoray(*_printed_command(run.stdout, "follow it with:"), timeout=120,
                        env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert no_token.returncode == 2, no_token.stdout[-2000:] + no_token.stderr[-2000:]
    assert no_token.stderr.strip().count("\n") == 0, no_token.stderr
    assert "refused panoray" in no_token.stderr and "RAY_AUTH_TOKEN" in no_token.stderr


# ------------------------------------------------------------- fast: no cluster, a fake client

def _spec(tmp_path: Path, **body) -> Path:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"kind": "segment", "src": "s3://b/in", "dst": "s3://b/out",
                                    "model": "s3://b/model", **body}))
    return spec


@pytest.mark.parametrize("src, says", [
    ("demo-out/archive", "'demo-out/archive' is a relative path"),
    ("~/photos", "'~/photos' is in this machine's home folder"),
    ("/data/photos", "'/data/photos' is a path on this machine"),
])
def test_a_local_path_is_refused_for_a_remote_cluster(src, says, tmp_path, capsys):
    from jobs.cli import main

    code = main(["submit", str(_spec(tmp_path, src=src)), "--address",
                 "http://head.invalid:8265"])  # refused before anything is contacted
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert says in err and "src" in err and "s3://" in err and "--paths-on-cluster" in err


def test_paths_on_cluster_sends_absolute_paths_and_never_relative_ones(tmp_path):
    from jobs.spec import SpecError, load_spec
    from jobs.submit import place_paths

    address = "http://head.invalid:8265"
    spec = load_spec(_spec(tmp_path, src="/mnt/shared/photos"))
    assert place_paths(spec, address=address, paths_on_cluster=True).args.src == \
        "/mnt/shared/photos"
    with pytest.raises(SpecError, match="relative path"):
        place_paths(load_spec(_spec(tmp_path, src="photos")), address=address,
                    paths_on_cluster=True)


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "http://localhost:8265"])
def test_relative_paths_are_made_absolute_for_a_cluster_on_this_machine(address, tmp_path,
                                                                        monkeypatch):
    from jobs.spec import load_spec, parse_spec
    from jobs.submit import SPEC_NAME, build_submission, place_paths

    monkeypatch.chdir(tmp_path)
    spec = place_paths(load_spec(_spec(tmp_path, src="in", dst="../out", model="s3://b/m")),
                       address=address)
    assert (spec.args.src, spec.args.dst, spec.args.model) == (
        str(tmp_path / "in"), str(tmp_path.parent / "out"), "s3://b/m")
    (tmp_path / "ship").mkdir()
    build_submission(spec, tmp_path / "ship")
    shipped = parse_spec(yaml.safe_load((tmp_path / "ship" / SPEC_NAME).read_text())).args
    assert shipped.src == str(tmp_path / "in")
    ft = parse_spec({"kind": "finetune", "train": "coco/train", "storage": "runs",
                     "model": "tiny"}, source="ft.yaml")
    ft = place_paths(ft, address=address).args
    assert (ft.train, ft.storage, ft.model) == (str(tmp_path / "coco/train"),
                                                str(tmp_path / "runs"), "tiny")


class _Status:
    def __init__(self, value: str) -> None:
        self.value = value


class FakeJobsClient:
    """JobSubmissionClient's answers for one job, from a script of (status, log so far)."""

    def __init__(self, script, *, message=None, kind="segment"):
        self.script, self.at, self.message, self.kind = list(script), -1, message, kind
        self.submitted = []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return "raysubmit_fake0000000000"

    def get_job_status(self, job_id):
        self.at = min(self.at + 1, len(self.script) - 1)
        return _Status(self.script[self.at][0])

    def get_job_logs(self, job_id):
        return self.script[max(self.at, 0)][1]

    def get_job_info(self, job_id):
        return type("Info", (), {"message": self.message, "status": self.script[-1][0],
                                 "metadata": {"panoray_kind": self.kind}})()


@pytest.fixture
def dashboard(monkeypatch):
    """Something listening where --address points (the address probe), and no sleeping."""
    import jobs.submit

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        monkeypatch.setattr(jobs.submit.time, "sleep", lambda s: None)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


FAILING_LOG = [
    ("PENDING", ""),
    ("RUNNING", "02:00:01 INFO pipeline.segment.job: 3 shards at s3://b/in: 0 already "
                "committed, 3 to do\n"),
    ("RUNNING", "02:00:01 INFO pipeline.segment.job: 3 shards at s3://b/in: 0 already "
                "committed, 3 to do\n02:00:09 INFO pipeline.segment.job: committed shard s1 "
                "(1/3 shards)\n"),
    ("FAILED", "02:00:01 INFO pipeline.segment.job: 3 shards at s3://b/in: 0 already "
               "committed, 3 to do\n02:00:09 INFO pipeline.segment.job: committed shard s1 "
               "(1/3 shards)\nTraceback (most recent call last):\n  File \"x.py\", line 1, in "
               "<module>\n    run()\nOSError: [Errno 28] No space left on device\n"),
]


def test_wait_streams_the_log_and_ends_with_the_jobs_last_error(tmp_path, dashboard,
                                                                monkeypatch, capsys):
    import jobs.submit
    from jobs.cli import main

    client = FakeJobsClient(FAILING_LOG, message="Job entrypoint command failed with exit "
                            "code 1, last available logs (truncated to 20,000 chars):")
    monkeypatch.setattr(jobs.submit, "connect", lambda address: client)
    code = main(["submit", str(_spec(tmp_path)), "--address", dashboard, "--wait"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.startswith(f"submitted raysubmit_fake0000000000 to {dashboard}\n")
    assert out.endswith(FAILING_LOG[-1][1])  # every line once, in order
    assert out.count("committed shard s1") == 1
    assert err.strip() == ("panoray submit: job raysubmit_fake0000000000 FAILED: OSError: "
                           "[Errno 28] No space left on device")
    assert client.submitted[0]["entrypoint"].endswith("--no-progress")


def test_wait_on_success_prints_the_jobs_summary(tmp_path, dashboard, monkeypatch, capsys):
    import jobs.submit
    from jobs.cli import main

    done = ("02:00:09 INFO pipeline.segment.job: committed shard s1 (1/1 shards)\n"
            "segment: 1 new shards done, 0 already done, 1 in s3://b/in\n"
            "images: 4 ok, 0 failed, 1.00 images/s over 4.0 s\noutput: s3://b/out/data/"
            "*.parquet\n2026-12-02 02:00:10,000\tINFO worker.py:1 -- shutting down\n")
    client = FakeJobsClient([("RUNNING", ""), ("SUCCEEDED", done)])
    monkeypatch.setattr(jobs.submit, "connect", lambda address: client)
    assert main(["submit", str(_spec(tmp_path)), "--address", dashboard, "--wait"]) == 0
    out = capsys.readouterr().out
    tail = out.split("job raysubmit_fake0000000000 SUCCEEDED:\n", 1)[1]
    assert tail.splitlines() == ["  segment: 1 new shards done, 0 already done, 1 in s3://b/in",
                                 "  images: 4 ok, 0 failed, 1.00 images/s over 4.0 s",
                                 "  output: s3://b/out/data/*.parquet"]


def test_logs_prints_and_follows_a_job(dashboard, monkeypatch, capsys):
    import jobs.submit
    from jobs.cli import main

    client = FakeJobsClient(FAILING_LOG)
    monkeypatch.setattr(jobs.submit, "connect", lambda address: client)
    assert main(["logs", "raysubmit_fake0000000000", "--address", dashboard]) == 0
    assert capsys.readouterr().out == ""  # the log as it stands: still pending
    client.at = -1
    assert main(["logs", "raysubmit_fake0000000000", "--address", dashboard, "--follow"]) == 1
    out, err = capsys.readouterr()
    assert out == FAILING_LOG[-1][1]
    assert err.startswith("panoray logs: job raysubmit_fake0000000000 FAILED: OSError")


@pytest.mark.parametrize("log, message, line", [
    ("INFO start\npanoray segment: error: nothing found at s3://b/in; check the path\n", None,
     "nothing found at s3://b/in; check the path"),
    ("\x1b[36m(MapWorker pid=12)\x1b[0m Traceback (most recent call last):\n"
     "\x1b[36m(MapWorker pid=12)\x1b[0m   File \"a.py\", line 3, in f\n"
     "\x1b[36m(MapWorker pid=12)\x1b[0m RuntimeError: CUDA out of memory\nshutting down\n", None,
     "RuntimeError: CUDA out of memory"),
    ("02:00:01 INFO x: fine\n02:00:02 ERROR pipeline.segment.job: a store went away\nbye\n",
     None, "02:00:02 ERROR pipeline.segment.job: a store went away"),
    ("", "Failed to set up the runtime environment: no pip package nosuch\nmore",
     "Failed to set up the runtime environment: no pip package nosuch"),
    ("/usr/bin/python: No module named jobs\n", "Job entrypoint command failed with exit code "
     "1, last available logs:", "/usr/bin/python: No module named jobs"),
])
def test_the_last_error_line_of_a_failed_job(log, message, line):
    from jobs.submit import last_error

    assert last_error(log, message) == line


def test_submit_rejects_a_bad_spec_before_contacting_anything(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("kind: segment\nsrc: a\ndst: b\nmodel: m\nbatchsize: 3\n")
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", str(spec), "--address",
                          "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert "unknown key 'batchsize'" in run.stderr and "Traceback" not in run.stderr
