"""Job specs: YAML files checked against typed schemas, run locally or submitted to a cluster.

A spec names its kind and the job's arguments; the same file drives
``panoray segment --spec FILE`` on a laptop and ``panoray submit FILE --address URL`` on a
cluster::

    kind: segment
    src: s3://archive/images/
    dst: s3://results/panoptic/
    model: s3://models/r50-coco-panoptic
    batch_size: 8
    runtime_env:              # only for submit: passed to Ray's JobSubmissionClient
      env_vars: {AWS_REGION: us-west-2}

The keys, their types, defaults and lower bounds are the fields of the job's parameter class
(`pipeline.params`: SegmentParams, FinetuneParams); a parsed spec's `args` is such an object.
Unknown keys and values of the wrong type are rejected, naming the key. Credentials never
belong in a spec (specs end up in job logs and dashboards): keys that look like secrets are
rejected; the AWS credential chain supplies them on each node.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import FinetuneParams, SegmentParams, as_kwargs, job_fields, param_types


class SpecError(ValueError):
    """A job spec that cannot be run as written."""


# A spec's keys are the fields of its job's parameters (pipeline.params), declared there once.
SegmentSpec = SegmentParams
FinetuneSpec = FinetuneParams
KINDS: dict[str, type] = {"segment": SegmentParams, "finetune": FinetuneParams}
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key", re.I)
_SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")


@dataclass
class JobSpec:
    kind: str
    args: Any  # the job's parameters: a SegmentParams or FinetuneParams
    runtime_env: dict = field(default_factory=dict)
    source: str = "<dict>"


def _check_no_secrets(data: Any, where: str) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            if _SECRET_KEY.search(str(k)):
                raise SpecError(f"{where}: key {k!r} looks like a credential; credentials don't "
                                "belong in job specs, the AWS credential chain supplies them")
            _check_no_secrets(v, where)
    elif isinstance(data, list):
        for v in data:
            _check_no_secrets(v, where)
    elif isinstance(data, str) and _SECRET_VALUE.search(data):
        raise SpecError(f"{where}: a value looks like an AWS access key; credentials don't "
                        "belong in job specs, the AWS credential chain supplies them")


def _coerce(key: str, tp: Any, optional: bool, minimum: float | None, value: Any,
            where: str) -> Any:
    if value is None and optional:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (
            tp is not bool and isinstance(value, bool))):
        raise SpecError(f"{where}: {key!r} must be {tp.__name__}, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: {key!r} must be at least {minimum}, got {value}")
    return value


def parse_spec(data: dict, *, source: str = "<dict>") -> JobSpec:
    """Check a spec dict against its kind's schema; raises SpecError naming the bad key."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a mapping with a 'kind' key")
    _check_no_secrets(data, source)
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in KINDS:
        raise SpecError(f"{source}: 'kind' must be one of {sorted(KINDS)}, got {kind!r}")
    runtime_env = data.pop("runtime_env", None) or {}
    if not isinstance(runtime_env, dict):
        raise SpecError(f"{source}: 'runtime_env' must be a mapping")
    cls = KINDS[kind]
    fields = {f.name: f for f in job_fields(cls)}
    hints = param_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecError(f"{source}: unknown key {unknown[0]!r} in a {kind} spec; valid keys: "
                        f"{', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in data and
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"{source}: missing required key {missing[0]!r} in a {kind} spec")
    args = {k: _coerce(k, *hints[k], fields[k].metadata["minimum"], v, source)
            for k, v in data.items()}
    try:
        params = cls(**args)
    except ValueError as e:  # the params' own checks (pipeline.params.check_params): choices
        raise SpecError(f"{source}: {e}") from None
    return JobSpec(kind=kind, args=params, runtime_env=runtime_env, source=source)


def load_spec(path: str | Path) -> JobSpec:
    """Read and check a YAML job spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"job spec {path} does not exist") from None
    except IsADirectoryError:
        raise SpecError(f"job spec {path} is a folder; pass a YAML file") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"job spec {path} is not a text file ({e.reason} at byte "
                        f"{e.start})") from None
    except OSError as e:
        raise SpecError(f"cannot read job spec {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(_yaml_error(path, e)) from None
    return parse_spec(data, source=str(path))


def _yaml_error(path: Path, error: yaml.YAMLError) -> str:
    """One line that keeps where in the file the YAML goes wrong (line and column, 1-based)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or not problem:
        return f"{path} is not valid YAML: {' '.join(str(error).split())}"
    context = getattr(error, "context", None)
    return (f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
            + (f" ({context})" if context else ""))


def spec_to_dict(spec: JobSpec) -> dict:
    """The YAML-able form of a spec (what `submit` ships to the cluster)."""
    out = {"kind": spec.kind, **as_kwargs(spec.args)}
    if spec.runtime_env:
        out["runtime_env"] = spec.runtime_env
    return out
