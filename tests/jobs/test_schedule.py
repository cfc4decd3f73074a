"""The schedule examples parse and keep the one-run-at-a-time policy."""

from __future__ import annotations

from pathlib import Path

import yaml

SCHEDULE = Path(__file__).resolve().parents[2] / "jobs" / "schedule"


def test_kubernetes_examples_forbid_overlapping_runs():
    for name in ("kubernetes-cronjob.yaml", "kuberay-raycronjob.yaml"):
        doc = yaml.safe_load((SCHEDULE / name).read_text())
        assert doc["spec"]["concurrencyPolicy"] == "Forbid", name
        assert len(doc["spec"]["schedule"].split()) == 5, name
        text = (SCHEDULE / name).read_text()
        assert "segment-s3.yaml" in text


def test_cron_example_runs_submit_with_a_spec():
    line = next(x for x in (SCHEDULE / "crontab.example").read_text().splitlines()
                if x and not x.startswith("#"))
    fields = line.split()
    assert len(fields[:5]) == 5 and "panoray" in line and "submit" in line and "flock" in line
