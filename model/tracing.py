"""Eager-only conveniences that must step aside while the model is traced.

`torch.compile`, `torch.export`, `make_fx` and `FakeTensorMode` run the model's Python code to
record a graph. Two things the eager model does would go wrong there: caching tensors across
calls (a traced graph must compute them itself, and no fake or traced tensor may reach a later
eager call) and checks that read tensor values back to the host (data-dependent control flow,
and on CUDA a synchronisation). `tracing()` says when to skip them; `cached_per_size` is the
per-size constant cache built on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def tracing() -> bool:
    """Whether the running code is being traced (torch.compile / export, make_fx, fake tensors)
    rather than run eagerly: then nothing may be cached across calls or read back to the host."""
    if torch.compiler.is_compiling():
        return True
    key = torch._C._TorchDispatchModeKey
    return (torch._C._get_dispatch_mode(key.FAKE) is not None
            or torch._C._get_dispatch_mode(key.PROXY) is not None)


def cached_per_size(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` (hashable arguments: sizes, a device, a dtype) -> tensors that depend on nothing
    else, cached per argument tuple (the last 32) in eager runs and recomputed while tracing.

    The cached tensors are made outside inference mode, so one entry serves inference and
    training alike (a tensor made under inference_mode could not be saved for a backward), and
    the forward never asks which of the two it runs in, a question `torch.compile` cannot trace.
    """
    @functools.lru_cache(maxsize=32)
    def cached(*args: Any) -> T:
        with torch.inference_mode(False):
            return fn(*args)

    @functools.wraps(fn)
    def wrapper(*args: Any) -> T:
        return fn(*args) if tracing() else cached(*args)

    wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    wrapper.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return wrapper
