"""Exactly once through failures: a worker node lost, or the predictor actor SIGKILLed, mid-shard
(a SIGKILLed driver, with a flaky S3: test_fault_campaign.py)."""

from __future__ import annotations

import os
import subprocess
import sys
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
