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
    page = Path(result["report"]).read_text()
    assert "<html" in page.lower() and "overlays/" in page
    for step in ("[1/5]", "[3/5]", "[5/5]", "Done in"):
        assert step in printed


def test_shipped_demo_model_covers_the_synthetic_label_space():
    net = load_bundle(str(SHIPPED_MODEL))
    assert {c.id for c in net.config.categories} == {c["id"] for c in SYNTH_CATEGORIES}
    assert "panoray finetune --spec" in (SHIPPED_MODEL / "README.md").read_text()


def test_the_shipped_bundle_is_small_package_data_made_by_its_recorded_recipe():
    import tomllib
    from safetensors import safe_open

    from jobs.demo import RECIPE, SHIPPED_MODEL
    from jobs.spec import load_spec
    from model.bundle import read_bundle_config

    weights = SHIPPED_MODEL / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    recipe = load_spec(RECIPE)
    assert recipe.kind == "finetune"
    info = read_bundle_config(str(SHIPPED_MODEL))
    assert info.name == recipe.args.name  # the final bundle of that run, copied unchanged
    with safe_open(str(weights), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes  # recipe.bundle_dtype: float16
    assert recipe.args.bundle_dtype == "float16"
    pyproject = tomllib.loads((SHIPPED_MODEL.parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["jobs"]
    shipped = {p.name for p in SHIPPED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "finetune.yaml"} <= shipped
    assert all(any(Path("demo_model", name).match(g) for g in globs) for name in shipped)
