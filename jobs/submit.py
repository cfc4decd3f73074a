"""`panoray submit SPEC --address http://HEAD:8265`: run a job spec on a running Ray cluster.

The spec is checked locally first (a typo fails here, not an hour later on the cluster), then
shipped in a small working_dir with the spec's own ``runtime_env`` merged in, and run there as
``python -m jobs.cli <kind> --spec <file>`` through Ray's Jobs API. The cluster's nodes have
panoray installed (see ray_cluster.yaml). Credentials are never part of what is sent: nodes use
their own AWS credential chain (instance roles).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml

from jobs.spec import JobSpec, load_spec, spec_to_dict

SPEC_NAME = "panoray-job.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def build_submission(spec: JobSpec, workdir: Path) -> dict:
    """The keyword arguments of JobSubmissionClient.submit_job for `spec` (writes the spec)."""
    body = spec_to_dict(spec)
    runtime_env = dict(body.pop("runtime_env", {}) or {})
    (workdir / SPEC_NAME).write_text(yaml.safe_dump(body, sort_keys=False))
    runtime_env["working_dir"] = str(workdir)
    return {
        "entrypoint": f"python -m jobs.cli {spec.kind} --spec {SPEC_NAME} --no-progress"
        if spec.kind == "segment" else f"python -m jobs.cli {spec.kind} --spec {SPEC_NAME}",
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


def submit(spec_path: str, *, address: str, wait: bool = False, poll_s: float = 2.0,
           timeout_s: float | None = None) -> tuple[str, str | None]:
    """Submit the job; returns (submission id, final status if `wait` else None)."""
    spec = load_spec(spec_path)
    _use_token_if_available()  # before importing ray, which reads the mode once
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="panoray-submit-") as tmp:
        job_id = _submit_with_retry(client, build_submission(spec, Path(tmp)))
    if not wait:
        return job_id, None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return job_id, status
        if deadline is not None and time.monotonic() > deadline:
            return job_id, status
        time.sleep(poll_s)
