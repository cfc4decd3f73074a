"""Job specs are checked against typed schemas before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.spec import FinetuneSpec, SegmentSpec, SpecError, load_spec, parse_spec, spec_to_dict

SPECS = Path(__file__).resolve().parents[2] / "jobs" / "specs"


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_example_specs_are_valid(path):
    spec = load_spec(path)
    assert isinstance(spec.args, (SegmentSpec, FinetuneSpec))
    # round trip: what submit ships parses to the same spec
    again = parse_spec(spec_to_dict(spec))
    assert again.args == spec.args and again.runtime_env == spec.runtime_env


def _segment(**extra):
    return {"kind": "segment", "src": "s3://a/in", "dst": "s3://a/out", "model": "m", **extra}


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(SpecError, match="unknown key 'bach_size'"):
        parse_spec(_segment(bach_size=4))


def test_wrong_type_is_rejected_by_name():
    with pytest.raises(SpecError, match="'batch_size' must be int"):
        parse_spec(_segment(batch_size="four"))
    with pytest.raises(SpecError, match="'batch_size' must be at least 1"):
        parse_spec(_segment(batch_size=0))


def test_missing_required_key_and_bad_kind():
    with pytest.raises(SpecError, match="missing required key 'model'"):
        parse_spec({"kind": "segment", "src": "a", "dst": "b"})
    with pytest.raises(SpecError, match="'kind' must be one of"):
        parse_spec({"kind": "segmnt"})


def test_credentials_are_refused_in_specs():
    with pytest.raises(SpecError, match="credential"):
        parse_spec(_segment(runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}))
    with pytest.raises(SpecError, match="access key"):
        parse_spec(_segment(src="s3://AKIAABCDEFGHIJKLMNOP@bucket/x"))


def test_int_is_accepted_where_a_float_is_expected():
    spec = parse_spec(_segment(gpus_per_actor=1))
    assert spec.args.gpus_per_actor == 1.0 and isinstance(spec.args.gpus_per_actor, float)
