"""`panoray submit SPEC --address http://HEAD:8265`: run a job spec on a running Ray cluster.

The spec is checked locally first (a typo fails here, not an hour later on the cluster), then
shipped in a small working_dir with the spec's own ``runtime_env`` merged in, and run there as
``python -m jobs.cli <kind> --spec <file> --no-progress`` through Ray's Jobs API. The cluster's
nodes have panoray installed (see ray_cluster.yaml). Credentials are never part of what is
sent: nodes use their own AWS credential chain (instance roles).

Paths in the spec (`place_paths`): the job runs in a working_dir of its own on the cluster, so a
relative path would name a folder there, and a path on this machine names nothing on a remote
node. URIs (s3://, gs://, ...) go as they are. For a cluster on this machine (an address on
127.0.0.1 / localhost) local paths are the same files: relative ones are made absolute (from
the current directory, as `panoray segment --spec` reads them). For a remote cluster a local
path is refused, naming the key, unless `paths_on_cluster` (``--paths-on-cluster``) says that
the absolute paths of the spec are paths every node mounts; a relative one is refused always.

`follow` streams a job's log while it runs (what `--wait` and `panoray logs --follow` print) and
returns how it ended: the job's last error line when it failed (`last_error`), its summary
lines when it succeeded (`summary_lines`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import yaml

from jobs.spec import JobSpec, SpecError, load_spec, spec_to_dict

SPEC_NAME = "panoray-job.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
# The keys of each kind that name files (a finetune `model` may also be a preset's name).
PATH_KEYS = {"segment": ("src", "dst", "model"), "finetune": ("train", "val", "storage", "model")}


def is_local_address(address: str) -> bool:
    """Whether a dashboard URL points at this machine (loopback), whose file system the
    cluster's node shares."""
    host = (urlsplit(address).hostname or "").lower()
    return host in LOCAL_HOSTS or host.startswith("127.")


def place_paths(spec: JobSpec, *, address: str, paths_on_cluster: bool = False) -> JobSpec:
    """The spec with its paths as the cluster's nodes must read them (see the module doc);
    a path they could not read is a SpecError naming the key and what to do instead."""
    from model.config import PRESETS
    from model.storage import absolute, is_remote

    local = is_local_address(address)
    changes = {}
    for key in PATH_KEYS[spec.kind]:
        value = getattr(spec.args, key)
        if not isinstance(value, str) or not value or is_remote(value):
            continue
        if key == "model" and (value in PRESETS if spec.kind == "finetune"
                               else spec.args.predictor):
            continue  # a preset's name; or whatever a user's own predictor takes
        if local:
            changes[key] = absolute(value)
            continue
        path = value[len("file://"):] if value.startswith("file://") else value
        if not os.path.isabs(path):
            where = (f"is in this machine's home folder, which the nodes of the cluster at "
                     f"{address} do not see" if path.startswith("~") else "is a relative "
                     f"path, which on the cluster at {address} would name a folder inside the "
                     "job's own working_dir")
            raise SpecError(
                f"{spec.source}: {key} {value!r} {where}; use an s3:// or gs:// URI, or an "
                "absolute path that every node mounts (with --paths-on-cluster)")
        if not paths_on_cluster:
            raise SpecError(
                f"{spec.source}: {key} {value!r} is a path on this machine, which the nodes of "
                f"the cluster at {address} do not see; use an s3:// or gs:// URI, or pass "
                "--paths-on-cluster if every node mounts that path")
    if not changes:
        return spec
    return dataclasses.replace(spec, args=dataclasses.replace(spec.args, **changes))


def build_submission(spec: JobSpec, workdir: Path) -> dict:
    """The keyword arguments of JobSubmissionClient.submit_job for `spec` (writes the spec)."""
    body = spec_to_dict(spec)
    runtime_env = dict(body.pop("runtime_env", {}) or {})
    if "working_dir" in runtime_env:
        raise SpecError(f"{spec.source}: runtime_env.working_dir is panoray's own (it ships the "
                        "spec); put code the job needs in runtime_env.py_modules instead")
    (workdir / SPEC_NAME).write_text(yaml.safe_dump(body, sort_keys=False))
    runtime_env["working_dir"] = str(workdir)
    return {
        "entrypoint": f"python -m jobs.cli {spec.kind} --spec {SPEC_NAME} --no-progress",
        "runtime_env": runtime_env,
        "metadata": {"panoray_kind": spec.kind, "panoray_spec": Path(spec.source).name},
    }


def _use_token_if_available() -> None:
    """Ray 2.60 clusters require a token by default; the Jobs client only sends one when
    RAY_AUTH_MODE=token. Where the user has a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) and set no mode, send it."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str):
    """A JobSubmissionClient for the dashboard at `address`, with the user's token if any."""
    _use_token_if_available()  # before importing ray, which reads the mode once
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _submit_with_retry(client, kwargs: dict, *, patience_s: float = 120.0) -> str:
    """A head that has just started answers "no available agent" for a while: wait for it."""
    deadline = time.monotonic() + patience_s
    delay = 1.0
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def submit(spec_path: str, *, address: str, paths_on_cluster: bool = False,
           client=None) -> str:
    """Check the spec, place its paths (`place_paths`) and submit it; returns the submission
    id."""
    spec = place_paths(load_spec(spec_path), address=address, paths_on_cluster=paths_on_cluster)
    client = client or connect(address)
    with tempfile.TemporaryDirectory(prefix="panoray-submit-") as tmp:
        return _submit_with_retry(client, build_submission(spec, Path(tmp)))


@dataclasses.dataclass
class JobEnd:
    """How a followed job ended (or where it stood when following stopped)."""

    job_id: str
    status: str
    kind: str | None = None
    error: str | None = None  # the job's last error line, when it did not succeed
    summary: list[str] = dataclasses.field(default_factory=list)  # when it succeeded


def follow(client, job_id: str, *, out: TextIO | None = None, poll_s: float = 2.0,
           timeout_s: float | None = None) -> JobEnd:
    """Print the job's log to `out` (stdout) as it grows, until the job ends (or `timeout_s`
    passes); then how it ended."""
    out = out or sys.stdout
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    printed = 0
    while True:
        status = str(client.get_job_status(job_id).value)  # first: the logs read next are
        logs = client.get_job_logs(job_id) or ""           # complete once it is terminal
        if len(logs) < printed:  # a log that was started afresh
            printed = 0
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(poll_s)
    if logs and not logs.endswith("\n"):  # what is printed next starts a line of its own
        out.write("\n")
    return job_end(client, job_id, status, logs)


def job_end(client, job_id: str, status: str, logs: str) -> JobEnd:
    info = client.get_job_info(job_id)
    kind = (getattr(info, "metadata", None) or {}).get("panoray_kind")
    end = JobEnd(job_id=job_id, status=status, kind=kind)
    if status == "SUCCEEDED":
        end.summary = summary_lines(logs, kind)
    elif status in TERMINAL:
        end.error = last_error(logs, getattr(info, "message", None))
    return end


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_WORKER_PREFIX = re.compile(r"^\([^()]*pid=\d+[^()]*\) ")  # Ray's "(Actor pid=12) " of a worker
_PANORAY_ERROR = re.compile(r"^panoray [\w-]+: error: ")
_ERROR_RECORD = re.compile(r"\bERROR\b")
_TRACEBACK = "Traceback (most recent call last):"
_LOG_RECORD = re.compile(r"^(\d{4}-\d\d-\d\d[ T]|\d\d:\d\d:\d\d |\[\d{4}-|\()")
# The first line of each command's summary (jobs.cli prints it last, on stdout).
_SUMMARY_HEAD = {"segment": re.compile(r"^segment: \d+ new shards"),
                 "finetune": re.compile(r"^finetune \S+: step \d+")}


def _clean_lines(logs: str) -> list[str]:
    return [_WORKER_PREFIX.sub("", _ANSI.sub("", line)).rstrip()
            for line in logs.replace("\r", "\n").splitlines()]


def last_error(logs: str, message: str | None = None) -> str:
    """The one line that says why a job failed: panoray's own error sentence, else the final
    line of the log's last traceback, else its last ERROR record, else Ray's message (the
    last log line when that message only says the entrypoint failed)."""
    lines = _clean_lines(logs)
    for line in reversed(lines):
        if _PANORAY_ERROR.match(line):
            return _PANORAY_ERROR.sub("", line)
    starts = [i for i, line in enumerate(lines) if line.startswith(_TRACEBACK)]
    if starts:
        for line in lines[starts[-1] + 1:]:
            if line and not line[0].isspace():
                return line
    for line in reversed(lines):
        if _ERROR_RECORD.search(line):
            return line.strip()
    first = (message or "").strip().splitlines()[:1]
    if first and not first[0].startswith("Job entrypoint command failed"):
        return first[0]
    rest = [line.strip() for line in lines if line.strip()]
    if rest:
        return rest[-1]
    return first[0] if first else "the job's log says nothing"


def summary_lines(logs: str, kind: str | None) -> list[str]:
    """The summary the job's command printed last (empty when none is found)."""
    head = _SUMMARY_HEAD.get(kind or "")
    if head is None:
        return []
    lines = _clean_lines(logs)
    starts = [i for i, line in enumerate(lines) if head.match(line)]
    if not starts:
        return []
    summary = []
    for line in lines[starts[-1]:]:
        if summary and (not line.strip() or _LOG_RECORD.match(line)):
            break
        summary.append(line)
    return summary
