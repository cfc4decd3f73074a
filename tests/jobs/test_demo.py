"""The demo runs end to end (with a stand-in model over the synthetic label space)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from jobs.demo import SHIPPED_MODEL, run_demo
from model.bundle import load_bundle, save_bundle
from model.config import Category, get_config
from model.mask2former import build_model
from pipeline.coco.synth import SYNTH_CATEGORIES


def _synthetic_label_space() -> tuple[Category, ...]:
    return tuple(Category(id=c["id"], name=c["name"], isthing=bool(c["isthing"]),
                          color=tuple(c["color"])) for c in SYNTH_CATEGORIES)


def test_demo_writes_archive_output_pq_and_overlays(tmp_path, ray_local, capsys):
    config = dataclasses.replace(get_config("tiny"), name="stand-in",
                                 categories=_synthetic_label_space())
    config = dataclasses.replace(config, inference=dataclasses.replace(
        config.inference, min_size=128, max_size=128))
    torch.manual_seed(0)
    model = str(tmp_path / "model")
    save_bundle(build_model(config), model)
    result = run_demo(out=str(tmp_path / "demo"), num_val=6, model=model)
    printed = capsys.readouterr().out
    assert result["images"] == 6
    assert len(list((tmp_path / "demo" / "segments" / "data").glob("*.parquet"))) >= 1
    pq = json.loads((tmp_path / "demo" / "pq.json").read_text())
    assert pq["images_gt"] == pq["images_matched"] == 6
    assert Path(result["contact_sheet"]).exists()
    for step in ("[1/5]", "[3/5]", "[5/5]", "Done in"):
        assert step in printed


def test_shipped_demo_model_covers_the_synthetic_label_space():
    net = load_bundle(str(SHIPPED_MODEL))
    assert {c.id for c in net.config.categories} == {c["id"] for c in SYNTH_CATEGORIES}
    assert (SHIPPED_MODEL / "README.md").read_text().count("run_finetune") >= 1
