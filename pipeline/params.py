"""The parameters of each job, declared once: the spec, the CLI and the Python API come from here.

Each job has one frozen dataclass, `SegmentParams` and `FinetuneParams`; every field gives its
type, its default and its help in one `param(...)`. From these:

- `jobs.spec` takes the YAML keys, their types and their lower bounds (a spec is the kind, a
  params object and a runtime_env);
- `jobs.cli` makes the flags (`--batch-size` from `batch_size`, the type from the annotation,
  the help and its `(default: X)` from here, booleans as switches);
- `run_segment` and `run_finetune` take the fields as keyword arguments, or a params object,
  through `with_params`.

A default of None means "decided at run time" and its help says how. The module imports neither
torch nor Ray, so `panoray --help` and spec checks stay instant.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

SIMPLE = (bool, int, float, str)


def param(default: Any = MISSING, help: str = "", *, minimum: float | None = None,
          choices: tuple[str, ...] | None = None, positional: bool = False,
          metavar: str | None = None, also: tuple[type, ...] = ()) -> Any:
    """One job parameter: its default (none given: required), a one-line help, an optional
    lower bound or set of choices, how the CLI shows it (a positional argument, a metavar),
    and `also`: values of these types are accepted from Python (a class where the CLI and
    specs name one as a string)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "minimum": minimum, "choices": choices, "positional": positional,
        "metavar": metavar, "also": also})


@functools.cache
def param_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """{field: (type without None, whether None is allowed)} of a params class."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        optional = False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            options = typing.get_args(tp)
            optional = type(None) in options
            tp = next(t for t in options if t is not type(None))
        out[name] = (tp, optional)
    return out


def job_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """The fields declared with `param` (a subclass may add others, e.g. the train loop's)."""
    return [f for f in dataclasses.fields(cls_or_obj) if "help" in f.metadata]


def as_kwargs(obj: Any) -> dict[str, Any]:
    """{field: value} of a params object, not copied (unlike dataclasses.asdict)."""
    return {f.name: getattr(obj, f.name) for f in job_fields(obj)}


def check_params(obj: Any) -> None:
    """Raise ValueError naming the first field of the wrong type or below its minimum; ints
    given for floats become floats."""
    hints = param_types(type(obj))
    for f in job_fields(obj):
        value = getattr(obj, f.name)
        tp, optional = hints[f.name]
        if (value is None and optional) or tp not in SIMPLE or \
                isinstance(value, f.metadata.get("also", ())):
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            object.__setattr__(obj, f.name, value)
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]
        if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
            raise ValueError(f"{f.name} must be {kind}, got {value!r}")
        minimum = f.metadata["minimum"]
        if minimum is not None and value < minimum:
            raise ValueError(f"{f.name} must be {kind} >= {minimum}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")


def with_params(cls: type) -> Callable[[Callable], Callable]:
    """Make `fn(params, *, extra=...)` callable as `fn(field=..., extra=...)` or
    `fn(params=obj, field=override, ...)`, with that keyword-only signature for inspect and
    help(): the fields' defaults are the dataclass's, never restated (the fields shown without
    a default are required unless `params` is given)."""
    names = {f.name for f in job_fields(cls)}

    def decorate(fn: Callable) -> Callable:
        own = inspect.signature(fn)
        _, *extras = own.parameters.values()
        extra_names = {p.name for p in extras}

        @functools.wraps(fn)
        def call(*, params: Any = None, **kwargs: Any) -> Any:
            unknown = sorted(set(kwargs) - names - extra_names)
            if unknown:
                raise TypeError(f"{fn.__name__}() got an unexpected keyword argument "
                                f"{unknown[0]!r}")
            options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            if params is None:
                params = cls(**options)
            elif options:
                params = dataclasses.replace(params, **options)
            return fn(params, **kwargs)

        kw = inspect.Parameter.KEYWORD_ONLY
        fields = [inspect.Parameter(f.name, kw, annotation=f.type, default=(
            inspect.Parameter.empty if f.default is MISSING else f.default))
            for f in job_fields(cls)]
        call.__signature__ = own.replace(parameters=[  # type: ignore[attr-defined]
            inspect.Parameter("params", kw, default=None, annotation=f"{cls.__name__} | None"),
            *fields, *extras])
        return call

    return decorate


# ---------------------------------------------------------------------------------- segment

@dataclass(frozen=True, kw_only=True)
class SegmentParams:
    """`panoray segment SRC DST --model BUNDLE`: one Parquet row per input image."""

    src: str = param(help="input URI: a folder or prefix of .tar shards, image files or "
                     ".parquet files (s3://, gs://, local)", positional=True, metavar="SRC")
    dst: str = param(help="output URI: DST/data/<shard>.parquet, one file per input shard",
                     positional=True, metavar="DST")
    model: str = param(help="model bundle URI (config.json + model.safetensors)",
                       metavar="BUNDLE")
    batch_size: int = param(4, "images per forward pass", minimum=1)
    compile: bool = param(False, "torch.compile each predictor's forward (pays on GPUs; the "
                          "first batch of each size then compiles, for minutes on a CPU)")
    num_actors: int | None = param(None, "predictor actors (default: one per GPU, else one "
                                   "per CPU)", minimum=1)
    gpus_per_actor: float | None = param(None, "GPUs of each predictor actor (default: 1 when "
                                         "the cluster has GPUs, else 0)", minimum=0)
    cpus_per_actor: float = param(1.0, "CPU reservation of each predictor actor", minimum=0)
    threads_per_actor: int | None = param(None, "torch threads per actor (default: the node's "
                                          "cores shared among CPU actors; 4 with a GPU)",
                                          minimum=1)
    files_per_shard: int = param(256, "image files grouped into one shard (file prefixes only)",
                                 minimum=1)
    image_column: str | None = param(None, "bytes column of Parquet inputs (default: detect)")
    max_pixels: int = param(100_000_000, "larger images become error rows (decompression "
                            "bombs)", minimum=1)
    limit_shards: int | None = param(None, "do at most this many new shards (e.g. for a trial)",
                                     minimum=0)
    stale_lock_s: float = param(300.0, "a writer lock without a heartbeat this long (seconds) "
                                "is taken over", minimum=0)
    address: str | None = param(None, "Ray cluster address (default: a local Ray instance)")
    predictor: str | None = param(None, "your own predictor class, as package.module:Class, "
                                  "built once per actor as Class(MODEL, **options) with a "
                                  "predict(images) method (see DESIGN.md); it must be "
                                  "importable on every node (default: panoray's "
                                  "PanopticPredictor)", metavar="CLASS", also=(type,))

    def __post_init__(self) -> None:
        check_params(self)


# --------------------------------------------------------------------------------- finetune

@dataclass(frozen=True, kw_only=True)
class FinetuneParams:
    """`panoray finetune`: Ray Train (TorchTrainer, DDP) on COCO-panoptic data."""

    train: str = param(help="COCO panoptic split URI (panoptic.json + images/ + panoptic/)")
    storage: str = param(help="Ray Train storage_path: a local folder or s3://; checkpoints "
                         "live here")
    name: str = param("panoray-finetune", "run name; re-running the same name resumes")
    val: str | None = param(None, "validation split URI for PQ every eval_every steps and at "
                            "the end (default: none)")
    model: str = param("tiny", "a preset name (random init) or a bundle URI to start from")
    steps: int = param(1000, "optimiser steps in total", minimum=1)
    batch_size: int = param(2, "images per worker per step", minimum=1)
    num_workers: int = param(1, "DDP workers", minimum=1)
    use_gpu: bool = param(False, "one GPU per worker")
    lr: float = param(1e-4, "AdamW learning rate", minimum=0)
    weight_decay: float = param(0.05, "AdamW weight decay (not on norms and embeddings)",
                                minimum=0)
    backbone_lr_multiplier: float = param(0.1, "backbone lr = lr * this", minimum=0)
    warmup_steps: int = param(10, "linear warmup steps before the poly schedule", minimum=0)
    clip_grad: float = param(0.01, "full-model gradient norm clipping", minimum=0)
    crop_size: int = param(256, "LSJ crop side (pixels)", minimum=32)
    min_scale: float = param(0.1, "LSJ random scale range: lower end", minimum=0)
    max_scale: float = param(2.0, "LSJ random scale range: upper end", minimum=0)
    num_points: int | None = param(None, "points sampled per mask for matching and the mask "
                                   "losses (default: the reference loss's, 112 x 112)",
                                   minimum=1)
    bundle_dtype: str = param("float32", "storage dtype of the weights in the saved bundles; "
                              "float16 or bfloat16 halve their size (a loaded model computes "
                              "in float32 all the same)",
                              choices=("float32", "float16", "bfloat16"), metavar="DTYPE")
    checkpoint_every: int = param(100, "steps between checkpoints", minimum=1)
    eval_every: int = param(0, "steps between validation PQ (0: only at the end)", minimum=0)
    num_to_keep: int = param(2, "checkpoints kept", minimum=1)
    max_failures: int = param(2, "worker group restarts from the latest checkpoint (-1: no limit)",
                              minimum=-1)
    seed: int = param(0, "seed of the initial weights, the data order and the augmentation")
    address: str | None = param(None, "Ray cluster address (default: a Ray instance of its own)")

    def __post_init__(self) -> None:
        check_params(self)
