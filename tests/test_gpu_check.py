"""`make gpu-check` refuses cleanly on a machine without a GPU (it is run on one by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run `make gpu-check`")
def test_gpu_check_says_in_one_line_that_there_is_no_gpu(tmp_path):
    report = tmp_path / "report.md"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"),
                          "--report", str(report)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], lines
    assert not report.exists()  # nothing was started
