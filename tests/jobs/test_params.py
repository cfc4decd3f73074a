"""One parameter object per job: the spec, the CLI and the Python API take their keys, types,
help and defaults from `pipeline.params`, and agree on every default."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.demo import SHIPPED_MODEL
from jobs.spec import parse_spec
from pipeline.params import (
    FinetuneParams,
    SegmentParams,
    as_kwargs,
    job_fields,
    with_params,
)

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"segment": {"src": "in", "dst": "out", "model": "m"},
            "finetune": {"train": "t", "storage": "s"}}
CLASSES = {"segment": SegmentParams, "finetune": FinetuneParams}


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere


def _option_help(text: str, flag: str) -> str:
    """The help of `flag` in a flattened --help text (the options part, not the usage)."""
    options = text[text.index("options:"):]
    match = re.search(rf" {re.escape(flag)}(?:, --no-\S+| [A-Z_]+)? (.*?)(?= --[a-z]|$)",
                      options)
    assert match, f"{flag} not in --help"
    return match.group(1)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("command", ["segment", "finetune"])
def test_help_shows_every_field_with_its_help_and_the_dataclass_default(command, capsys):
    text = _help(capsys, command)
    for f in job_fields(CLASSES[command]):
        if f.metadata["positional"]:
            assert f.metadata["metavar"] in text and " ".join(f.metadata["help"].split()) in text
            continue
        shown = _option_help(text, _flag(f.name))
        assert shown.startswith(f.metadata["help"]), (f.name, shown)
        if f.default is not dataclasses.MISSING and f.default is not None:
            default = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            assert f"(default: {default})" in shown, (f.name, shown)
            assert shown.count("(default:") == 1, (f.name, shown)


def test_segment_help_shows_the_dataclass_default(capsys):
    text = _help(capsys, "segment")
    assert "(default: 4)" in _option_help(text, "--batch-size")
    assert SegmentParams.__dataclass_fields__["batch_size"].default == 4
    assert "--no-progress" in text


def _captured(monkeypatch, module: str, name: str, result):
    import importlib

    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return result(kwargs)

    monkeypatch.setattr(importlib.import_module(module), name, fake)
    # the paths here are placeholders: the CLI's checks of a job's inputs (jobs.cli.check_*,
    # tested in test_mistakes.py) are not what these tests are about
    import jobs.cli

    for check in ("check_segment", "check_finetune"):
        monkeypatch.setattr(jobs.cli, check, lambda params: None)
    return calls


@pytest.mark.parametrize("command", ["segment", "finetune"])
def test_spec_cli_and_python_api_agree_on_every_default(command, monkeypatch):
    cls = CLASSES[command]
    from pipeline.segment.job import SegmentSummary, run_segment
    from pipeline.train.job import run_finetune

    api = inspect.signature({"segment": run_segment, "finetune": run_finetune}[command])
    spec = parse_spec({"kind": command, **REQUIRED[command]}).args
    if command == "segment":
        calls = _captured(monkeypatch, "pipeline.segment.job", "run_segment",
                          lambda kw: SegmentSummary(src="in", dst="out"))
        assert main(["segment", "in", "out", "--model", "m"]) == 0
    else:
        calls = _captured(monkeypatch, "pipeline.train.job", "run_finetune", lambda kw: {
            "name": "n", "step": 1, "start_step": 0, "final_bundle": "b", "metrics": {}})
        assert main(["finetune", "--train", "t", "--storage", "s"]) == 0
    cli = calls[0]["params"]
    for f in job_fields(cls):
        if f.default is dataclasses.MISSING:
            assert api.parameters[f.name].default is inspect.Parameter.empty
            continue
        assert getattr(spec, f.name) == f.default, f.name
        assert getattr(cli, f.name) == f.default, f.name
        assert api.parameters[f.name].default == f.default, f.name
    assert spec == cli == cls(**REQUIRED[command])


def test_flags_given_override_the_spec_file_and_nothing_else(tmp_path, monkeypatch):
    spec = tmp_path / "ft.yaml"
    spec.write_text("kind: finetune\ntrain: t\nstorage: s\nsteps: 50\nuse_gpu: true\n"
                    "num_points: 2048\nlr: 0.001\n")
    calls = _captured(monkeypatch, "pipeline.train.job", "run_finetune", lambda kw: {
        "name": "n", "step": 1, "start_step": 0, "final_bundle": "b", "metrics": {}})
    assert main(["finetune", "--spec", str(spec), "--steps", "7", "--no-use-gpu"]) == 0
    params = calls[0]["params"]
    assert (params.steps, params.use_gpu, params.num_points, params.lr) == (7, False, 2048, 1e-3)
    assert params.batch_size == FinetuneParams.__dataclass_fields__["batch_size"].default


def test_a_flag_below_its_minimum_is_one_sentence(capsys):
    assert main(["segment", "a", "b", "--model", "m", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "'batch_size' must be at least 1" in err and "Traceback" not in err


def test_the_python_api_takes_keywords_or_a_params_object():
    @with_params(SegmentParams)
    def job(p: SegmentParams, *, progress: bool = True) -> tuple[SegmentParams, bool]:
        return p, progress

    params, progress = job(src="a", dst="b", model="m", batch_size=8, progress=False)
    assert params == SegmentParams(src="a", dst="b", model="m", batch_size=8) and not progress
    again, _ = job(params=params, limit_shards=2)
    assert again == dataclasses.replace(params, limit_shards=2) and params.limit_shards is None
    assert job(params=params)[0] is params
    with pytest.raises(TypeError, match="unexpected keyword argument 'bach_size'"):
        job(src="a", dst="b", model="m", bach_size=8)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        job(src="a", dst="b", model="m", batch_size=0)
    with pytest.raises(ValueError, match="gpus_per_actor must be a number"):
        job(src="a", dst="b", model="m", gpus_per_actor="one")
    assert job(src="a", dst="b", model="m", gpus_per_actor=1)[0].gpus_per_actor == 1.0
    names = list(inspect.signature(job).parameters)
    assert names == ["params", *(f.name for f in job_fields(SegmentParams)), "progress"]


def test_the_demo_bundle_recipe_is_a_finetune_spec():
    """The settings that made jobs/demo_model are a finetune spec, and its README says so."""
    from jobs.demo import RECIPE
    from jobs.spec import load_spec

    params = load_spec(RECIPE).args
    assert params.num_points == 2048 and params.steps == 1200 and params.crop_size == 96
    readme = (SHIPPED_MODEL / "README.md").read_text()
    assert "panoray finetune --spec jobs/demo_model/finetune.yaml" in readme
    # every non-default setting is written in the spec file itself, not left to defaults
    written = {line.split(":")[0] for line in RECIPE.read_text().splitlines()
               if line and not line.startswith(("#", " "))}
    defaults = as_kwargs(FinetuneParams(train="t", storage="s"))
    assert {k for k, v in as_kwargs(params).items() if v != defaults[k]} <= written


def test_building_the_cli_imports_neither_torch_nor_ray():
    code = ("import sys, jobs.cli, jobs.spec; jobs.cli.build_parser(); "
            "print(sorted({'torch', 'ray'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
