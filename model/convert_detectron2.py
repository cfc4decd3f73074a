"""Import (and export) the reference detectron2 Mask2Former `.pkl` checkpoints.

    config, state_dict = convert_detectron2("model_final_94dc52.pkl", preset="r50-coco-panoptic")
    net = build_model(config); net.load_state_dict(state_dict)

A `.pkl` is a pickle of `{"model": {key: numpy array}, "__author__": ...}` (detectron2 model zoo)
or a bare `{key: array}` dict. Pickles can run arbitrary code when loaded, so they are read with
a restricted unpickler that builds numpy arrays, dicts, lists, strings and numbers and refuses
every other global (`UnsafeCheckpointError`) before anything runs.

The pickle holds no config, so the caller names the preset; every key and shape is checked
against it. Key map (everything under `sem_seg_head.` keeps its name, see model/mask2former.py):

    backbone.stem.conv1.{weight, norm.*}             -> backbone.conv1.weight, backbone.bn1.*
    backbone.res{2-5}.N.conv{1-3}.{weight, norm.*}   -> backbone.layer{1-4}.N.conv{1-3} / bn{1-3}
    backbone.res{2-5}.N.shortcut.{weight, norm.*}    -> backbone.layer{1-4}.N.downsample.{0, 1}
    backbone.patch_embed.{proj, norm}                -> backbone.features.0.{0, 2}        (Swin)
    backbone.layers.S.blocks.B.{norm1, attn.*, norm2} -> backbone.features.{2S+1}.B.*
    backbone.layers.S.blocks.B.mlp.{fc1, fc2}        -> backbone.features.{2S+1}.B.mlp.{0, 3}
    backbone.layers.S.downsample.{reduction, norm}   -> backbone.features.{2S+2}.*
    backbone.norm{0-3}                               -> backbone.norm{0-3}

Dropped on import: `criterion.*` (the loss's class weights), `pixel_mean` / `pixel_std` (config),
`*.relative_position_index` (rebuilt from the window size) and `*.num_batches_tracked`.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from model.bundle import BundleMismatchError, state_dict_mismatch
from model.config import Category, Mask2FormerConfig, get_config
from model.mask2former import build_model
from model.storage import filesystem_for


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle that refers to something other than plain data and numpy arrays."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import codecs

    try:  # numpy >= 2 moved the module; pickles written by numpy 1.x still name the old one
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, numbers, strings and numpy arrays / dtypes / scalars."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"checkpoint refers to {module}.{name}, which is not part of a numpy array; "
                "refusing to load it (only arrays, dicts, lists, strings and numbers are "
                "allowed) - get the checkpoint from a trusted source") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            "checkpoint uses pickle persistent ids (a torch.save file?), not a detectron2 .pkl; "
            "convert it with torch.load in a trusted environment first")


def read_detectron2_pickle(src_uri: str) -> dict[str, np.ndarray]:
    """The `{key: array}` weights of a detectron2 `.pkl` at any URI, read safely."""
    fs, path = filesystem_for(src_uri)
    with fs.open(path, "rb") as f:
        data = _ArrayUnpickler(f, encoding="latin1").load()
    if isinstance(data, Mapping) and "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]  # model zoo format
    elif isinstance(data, Mapping) and "blobs" in data:
        data = data["blobs"]  # Caffe2 / Detectron1 format
    if not isinstance(data, Mapping):
        raise ValueError(f"{src_uri} holds a {type(data).__name__}, not a dict of arrays; "
                         "pass a detectron2 checkpoint (.pkl)")
    weights = {}
    for key, value in data.items():
        if str(key).endswith("_momentum"):
            continue
        array = np.asarray(value) if isinstance(value, np.ndarray | np.generic) else None
        if array is None or array.dtype.kind not in "biuf":
            what = (f"an array of dtype {array.dtype}" if array is not None
                    else f"a {type(value).__name__}")
            raise ValueError(f"{src_uri}: entry {key!r} is {what}, not a numeric array; pass a "
                             "detectron2 checkpoint (.pkl)")
        weights[str(key)] = array
    return weights


def convert_detectron2(
    src_uri: str,
    *,
    preset: str | Mask2FormerConfig,
    categories: Sequence[Category] | None = None,
) -> tuple[Mask2FormerConfig, dict[str, torch.Tensor]]:
    """Read a detectron2 Mask2Former `.pkl` into (config, state dict) for `build_model`.

    Args:
        src_uri: the `.pkl`, local path or any URI `model.storage` opens (`?endpoint=` too).
        preset: the architecture it was trained with (a preset name or a config).
        categories: label space, when it differs from the preset's (e.g. ADE20K weights on a
            COCO preset architecture).

    Raises UnsafeCheckpointError for pickles that would run code, and BundleMismatchError naming
    the keys when the weights do not fit the preset.
    """
    config = get_config(preset) if isinstance(preset, str) else preset
    if categories is not None:
        config = dataclasses.replace(config, categories=tuple(categories))
    arrays = read_detectron2_pickle(src_uri)
    with torch.device("meta"):  # shapes only, no memory
        reference = build_model(config)
    expected = reference.state_dict()
    to_ours = detectron2_key_map(reference)
    state_dict = {}
    for d2_key, array in arrays.items():
        key = to_ours.get(d2_key)
        if key is None:
            if _DROPPED.fullmatch(d2_key):
                continue
            key = d2_key  # reported as unexpected below
        tensor = torch.from_numpy(_native(array))
        if key in expected:
            tensor = tensor.to(expected[key].dtype)
        state_dict[key] = tensor
    problems = state_dict_mismatch(reference, state_dict)
    if problems:
        raise BundleMismatchError(
            f"{src_uri} does not fit preset {config.name!r}: {problems}; pass the preset the "
            "checkpoint was trained with (and categories= for another label space)")
    return config, state_dict


def to_detectron2_state_dict(net: nn.Module) -> dict[str, np.ndarray]:
    """`net`'s weights under detectron2 names as numpy arrays (the inverse of the import)."""
    return {ours_key_to_detectron2(k): v.detach().cpu().numpy().copy()
            for k, v in net.state_dict().items()}


def export_detectron2(net: nn.Module, dst_uri: str) -> None:
    """Write `net` as a detectron2 model-zoo style `.pkl` at any URI."""
    payload = {"model": to_detectron2_state_dict(net), "__author__": "panoray"}
    fs, path = filesystem_for(dst_uri)
    with fs.open(path, "wb") as f:
        pickle.dump(payload, f, protocol=4)


# ------------------------------------------------------------------------------- key mapping
# One table, ours -> detectron2; imports invert it over the model's own keys, so the two
# directions cannot drift apart.

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _rule(pattern: str, build: Callable[[re.Match[str]], str]) -> Rule:
    return re.compile(pattern), build


_OURS_TO_D2: list[Rule] = [
    _rule(r"backbone\.conv1\.weight", lambda m: "backbone.stem.conv1.weight"),
    _rule(r"backbone\.bn1\.(\w+)", lambda m: f"backbone.stem.conv1.norm.{m[1]}"),
    _rule(r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight",
          lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    _rule(r"backbone\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)",
          lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    _rule(r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight",
          lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    _rule(r"backbone\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)",
          lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
    _rule(r"backbone\.features\.0\.0\.(\w+)", lambda m: f"backbone.patch_embed.proj.{m[1]}"),
    _rule(r"backbone\.features\.0\.2\.(\w+)", lambda m: f"backbone.patch_embed.norm.{m[1]}"),
    _rule(r"backbone\.features\.(\d*[13579])\.(\d+)\.mlp\.([03])\.(\w+)",
          lambda m: f"backbone.layers.{int(m[1]) // 2}.blocks.{m[2]}.mlp."
                    f"fc{1 if m[3] == '0' else 2}.{m[4]}"),
    _rule(r"backbone\.features\.(\d*[13579])\.(\d+)\.(.+)",
          lambda m: f"backbone.layers.{int(m[1]) // 2}.blocks.{m[2]}.{m[3]}"),
    _rule(r"backbone\.features\.(\d*[02468])\.(.+)",
          lambda m: f"backbone.layers.{int(m[1]) // 2 - 1}.downsample.{m[2]}"),
]

_DROPPED = re.compile(r"(criterion\..*|pixel_mean|pixel_std|.*\.relative_position_index"
                      r"|.*\.num_batches_tracked)")


def _apply(rules: list[Rule], key: str) -> str:
    for pattern, build in rules:
        match = pattern.fullmatch(key)
        if match:
            return build(match)
    return key  # sem_seg_head.* and Swin's backbone.norm{i} share names


def ours_key_to_detectron2(key: str) -> str:
    """The detectron2 key for one of our state-dict keys."""
    return _apply(_OURS_TO_D2, key)


def detectron2_key_map(net: nn.Module) -> dict[str, str]:
    """{detectron2 key: our key} for every entry of `net`'s state dict (import direction)."""
    return {ours_key_to_detectron2(k): k for k in net.state_dict()}


def _native(array: np.ndarray) -> np.ndarray:
    """A writable, contiguous, native-byte-order array torch.from_numpy accepts (copies only
    when needed)."""
    array = np.ascontiguousarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array if array.flags.writeable else array.copy()
