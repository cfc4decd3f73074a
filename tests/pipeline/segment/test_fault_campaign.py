"""Exactly once under faults: a short, seeded fault campaign (bench/faults.py runs a long one).

A flaky S3 between the job and its data (503 SlowDown, 500, resets before and after the store
applies a request, slow answers), the driver SIGKILLed after a random number of commits, and
the job run again until it ends well: the output equals a clean run's, row for row and byte
for byte.
"""

from __future__ import annotations

import pytest
from fault_campaign import clean_run, make_archive, trial
from segment_helpers import tiny_bundle


@pytest.mark.slow
def test_a_short_fault_campaign_loses_nothing_and_doubles_nothing(tmp_path, s3_server,
                                                                   s3_bucket, ray_local):
    bundle = tiny_bundle(str(tmp_path / "bundle"))
    src = f"s3://{s3_bucket}/in"
    ids = make_archive(src, tars=2, per_tar=3, loose=4)
    reference = clean_run(src, f"s3://{s3_bucket}/clean", bundle)
    assert [r[0] for r in reference] == ids and {r[1] for r in reference} == {"ok"}
    # The drivers join the tests' Ray (no Ray start per run); lower rates than the bench's.
    result = trial(11, src=src, dst=f"s3://{s3_bucket}/out", bundle=bundle,
                   upstream=s3_server, reference=reference, shards=4, kill_driver=True,
                   address=ray_local.get_runtime_context().gcs_address,
                   rates={"slowdown": 0.02, "error": 0.02, "reset": 0.015,
                          "reset_after": 0.015, "slow": 0.02})
    assert result.driver_kills == 1 and result.runs >= 2, result
    assert sum(result.faults.values()) >= 5, result.faults  # the store really was flaky
    assert (result.rows, result.duplicates, result.missing, result.differing) == (
        len(ids), 0, 0, 0), result
