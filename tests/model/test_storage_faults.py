"""The storage door rides out a flaky S3 (throttling, 500s, resets, slow answers) and gives up
with an error, not a hang, on a store that stays down. Faults come from tests/s3_fault_proxy.py
in front of the moto server."""

from __future__ import annotations

import time

import pytest
from s3_fault_proxy import FaultProxy

from model.storage import get_filesystem, pyarrow_filesystem


@pytest.fixture
def flaky(s3_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    with FaultProxy(s3_server, seed=3, slowdown=0.08, error=0.08, reset=0.08,
                    reset_after=0.08, slow=0.04, slow_s=0.1) as proxy:
        yield proxy, f"s3://{s3_bucket}/p?endpoint={proxy.url}"


def test_fsspec_and_pyarrow_ride_out_transient_faults(flaky):
    proxy, root = flaky
    fs, path = get_filesystem(root)
    blobs = {f"{path}/k{i}.bin": bytes([i]) * (1000 + i) for i in range(8)}
    for key, data in blobs.items():
        fs.pipe_file(key, data)  # a PUT repeated after a lost answer is harmless
    assert sorted(fs.find(path)) == sorted(blobs)
    for key, data in blobs.items():
        assert fs.cat_file(key) == data
    pa_fs, pa_path = pyarrow_filesystem(root)
    with pa_fs.open_input_stream(f"{pa_path}/k3.bin") as f:
        assert f.read() == blobs[f"{path}/k3.bin"]
    assert proxy.injected >= 4, proxy.counts  # the faults really happened
    assert all(proxy.counts[k] for k in ("slowdown", "error", "reset", "reset_after"))


def test_a_store_that_stays_down_ends_in_an_error_not_a_hang(flaky, monkeypatch):
    proxy, root = flaky
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # the shipped 8 tries take about a minute
    proxy.down = True
    fs, path = get_filesystem(root)
    started = time.monotonic()
    with pytest.raises(OSError, match="Service Unavailable|SlowDown"):
        fs.cat_file(f"{path}/missing.bin")
    assert time.monotonic() - started < 60
    assert proxy.counts["down"] >= 3  # it did retry before giving up
