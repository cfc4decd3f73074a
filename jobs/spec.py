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

Unknown keys and values of the wrong type are rejected, naming the key. Credentials never
belong in a spec (specs end up in job logs and dashboards): keys that look like secrets are
rejected; the AWS credential chain supplies them on each node.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """A job spec that cannot be run as written."""


@dataclass
class SegmentSpec:
    """`panoray segment SRC DST --model BUNDLE`: one Parquet row per input image."""

    src: str  # input URI: a folder or prefix of tar shards, image files or Parquet files
    dst: str  # output URI: DST/data/<shard>.parquet, one file per input shard
    model: str  # model bundle URI (config.json + model.safetensors)
    batch_size: int = 4  # images per forward pass
    num_actors: int | None = None  # predictor actors; default: one per GPU, else CPUs - 1
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0  # CPU reservation of each predictor actor
    threads_per_actor: int | None = None  # torch threads in a CPU actor; default: all cores
    files_per_shard: int = 256  # image files grouped into one shard (file prefixes only)
    image_column: str | None = None  # bytes column of Parquet inputs; default: autodetect
    max_pixels: int = 100_000_000  # larger images become error rows (decompression bombs)
    limit_shards: int | None = None  # process at most this many new shards (e.g. for a trial)
    stale_lock_s: float = 300.0  # a writer lock without heartbeat this long is taken over
    address: str | None = None  # Ray address; default: a local Ray instance


@dataclass
class FinetuneSpec:
    """`panoray finetune`: Ray Train (TorchTrainer, DDP) on COCO-panoptic data."""

    train: str  # COCO panoptic split URI (panoptic.json + images/ + panoptic/)
    storage: str  # Ray Train storage_path: local folder or s3://; checkpoints live here
    name: str = "panoray-finetune"  # run name; re-running the same name resumes
    val: str | None = None  # validation split URI for PQ every eval_every steps
    model: str = "tiny"  # a preset name (random init) or a bundle URI to start from
    steps: int = 1000  # optimiser steps in total
    batch_size: int = 2  # images per worker per step
    num_workers: int = 1  # DDP workers
    use_gpu: bool = False  # one GPU per worker
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay (not on norms and embeddings)
    backbone_lr_multiplier: float = 0.1  # backbone lr = lr * this
    warmup_steps: int = 10  # linear warmup before the poly schedule
    clip_grad: float = 0.01  # full-model gradient norm clipping
    crop_size: int = 256  # LSJ crop side (pixels)
    min_scale: float = 0.1  # LSJ random scale range
    max_scale: float = 2.0
    checkpoint_every: int = 100  # steps between checkpoints
    eval_every: int = 0  # steps between validation PQ (0: only at the end)
    num_to_keep: int = 2  # checkpoints kept
    max_failures: int = 2  # worker group restarts from the latest checkpoint
    seed: int = 0
    address: str | None = None


KINDS: dict[str, type] = {"segment": SegmentSpec, "finetune": FinetuneSpec}
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key", re.I)
_SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")


@dataclass
class JobSpec:
    kind: str
    args: Any  # a SegmentSpec or FinetuneSpec
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


def _coerce(key: str, tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        tp = next(t for t in options if t is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (
            tp is not bool and isinstance(value, bool))):
        raise SpecError(f"{where}: {key!r} must be {tp.__name__}, got {value!r}")
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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecError(f"{source}: unknown key {unknown[0]!r} in a {kind} spec; valid keys: "
                        f"{', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in data and
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"{source}: missing required key {missing[0]!r} in a {kind} spec")
    args = {k: _coerce(k, hints[k], v, source) for k, v in data.items()}
    for k in ("batch_size", "steps", "num_workers", "files_per_shard", "max_pixels"):
        if k in args and args[k] is not None and args[k] < 1:
            raise SpecError(f"{source}: {k!r} must be at least 1, got {args[k]}")
    return JobSpec(kind=kind, args=cls(**args), runtime_env=runtime_env, source=source)


def load_spec(path: str | Path) -> JobSpec:
    """Read and check a YAML job spec file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"job spec {path} does not exist") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None
    return parse_spec(data, source=str(path))


def spec_to_dict(spec: JobSpec) -> dict:
    """The YAML-able form of a spec (what `submit` ships to the cluster)."""
    out = {"kind": spec.kind, **dataclasses.asdict(spec.args)}
    if spec.runtime_env:
        out["runtime_env"] = spec.runtime_env
    return out
