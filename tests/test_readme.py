"""The README's "From Python" example runs as written and answers what `panoray segment` does."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.coco.panoptic_io import decode_panoptic_png
from pipeline.segment.job import run_segment

ROOT = Path(__file__).resolve().parents[1]


def _python_block(section: str) -> str:
    """The first ```python block under the README heading `## {section}`."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_from_python_example_equals_the_segment_job_bit_for_bit(tmp_path, monkeypatch,
                                                                ray_local):
    monkeypatch.chdir(ROOT)  # the example uses paths relative to the repository root
    example: dict = {}
    exec(compile(_python_block("From Python"), "README.md", "exec"), example)  # noqa: S102
    ids, segments, photo = example["ids"], example["segments"], Path(example["photo"])
    assert ids.dtype == np.int32 and ids.shape == example["image"].shape[:2]
    assert segments, "the demo model finds nothing in the photo"

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(photo, src / photo.name)
    summary = run_segment(src=str(src), dst=str(tmp_path / "out"),
                          model=str(ROOT / "jobs" / "demo_model"), progress=False)
    assert summary.images_ok == 1
    [row] = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet"))).to_pylist()
    job_ids = decode_panoptic_png(row["panoptic_png"])
    assert job_ids.shape == ids.shape
    agreement = float((job_ids == ids).mean())
    assert agreement == 1.0, f"{agreement:.4%} of the pixels agree with the segment job"
    keys = ("id", "category_id", "isthing", "score")  # scores: float32 on both sides
    assert [{k: s[k] for k in keys} for s in row["segments_info"]] == [
        {k: s[k] for k in keys} for s in segments]
