"""Model bundles: a folder at any fsspec URI holding `config.json` and `model.safetensors`.

    save_bundle(net, "s3://bucket/models/coco-r50")         # local paths work the same
    net = load_bundle("s3://bucket/models/coco-r50")
    net.model_id                                            # "coco-r50@3f2a9c0d41b7"

`config.json` holds the format version, the bundle name and the full `Mask2FormerConfig`
(architecture + label space), so the folder alone rebuilds the model. The `model_id` names the
bundle and the exact weights (a prefix of the SHA-256 of `model.safetensors`); output rows carry
it so a result can always be traced to the weights that produced it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from model.config import Mask2FormerConfig
from model.mask2former import build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "panoray-bundle"
FORMAT_VERSION = 1
_HASH_CHARS = 12
# Parameters whose shape depends on the number of classes (re-initialised for a new label space).
CLASS_HEAD_PREFIX = "sem_seg_head.predictor.class_embed."


class BundleMismatchError(ValueError):
    """Weights that do not fit the architecture described by the config."""


def save_bundle(net: nn.Module, uri: str, *, name: str | None = None,
                filesystem: fsspec.AbstractFileSystem | None = None) -> str:
    """Write `net` (a Mask2Former with a `.config`) as a bundle folder at `uri`.

    Overwrites an existing bundle there. Sets and returns `net.model_id`. `filesystem`: an
    fsspec filesystem to use instead of the one `uri` implies (e.g. with custom credentials).
    """
    config = _config_of(net)
    name = name or config.name
    weights = save_safetensors(_plain_state_dict(net), metadata={"format": "pt"})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
                "config": config.to_dict()}
    fs, root = _resolve(uri, filesystem)
    fs.makedirs(root, exist_ok=True)
    # Weights first: a reader never sees a config.json beside missing or stale weights
    # of a fresh bundle.
    with fs.open(posixpath.join(root, WEIGHTS_FILE), "wb") as f:
        f.write(weights)
    with fs.open(posixpath.join(root, CONFIG_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    net.model_id = make_model_id(name, weights)
    return net.model_id


def load_bundle(uri: str, *, map_location: str | torch.device = "cpu",
                filesystem: fsspec.AbstractFileSystem | None = None) -> nn.Module:
    """Rebuild the model saved at `uri`, in eval mode, with `model_id` and `bundle_name` set."""
    fs, root = _resolve(uri, filesystem)
    config_path, weights_path = (posixpath.join(root, n) for n in (CONFIG_FILE, WEIGHTS_FILE))
    missing = [n for n, p in ((CONFIG_FILE, config_path), (WEIGHTS_FILE, weights_path))
               if not fs.exists(p)]
    if missing:
        raise FileNotFoundError(f"{uri} is not a model bundle: {', '.join(missing)} missing; "
                                "write one with save_bundle or `panoray convert`")
    with fs.open(config_path, "r") as f:
        manifest = json.load(f)
    config = _read_manifest(manifest, uri)
    with fs.open(weights_path, "rb") as f:
        weights = f.read()
    state_dict = load_safetensors(weights)
    net = build_model(config)
    try:
        load_state_dict_into(net, state_dict)
    except BundleMismatchError as err:
        raise BundleMismatchError(f"bundle {uri}: {err}") from None
    net.to(map_location).eval()
    net.bundle_name = manifest["name"]
    net.model_id = make_model_id(manifest["name"], weights)
    return net


def bundle_id(uri: str, *, filesystem: fsspec.AbstractFileSystem | None = None) -> str:
    """The `model_id` of the bundle at `uri` ("name@hash"), without building the model."""
    fs, root = _resolve(uri, filesystem)
    try:
        with fs.open(posixpath.join(root, CONFIG_FILE), "r") as f:
            name = json.load(f)["name"]
        digest = hashlib.sha256()
        with fs.open(posixpath.join(root, WEIGHTS_FILE), "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} is not a model bundle (no {CONFIG_FILE} or "
                                f"{WEIGHTS_FILE}); write one with save_bundle") from None
    return f"{name}@{digest.hexdigest()[:_HASH_CHARS]}"


def make_model_id(name: str, weights: bytes) -> str:
    """`name@<first 12 hex digits of sha256(weights)>`."""
    return f"{name}@{hashlib.sha256(weights).hexdigest()[:_HASH_CHARS]}"


def load_state_dict_into(net: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                         reinit_class_head: bool = False) -> None:
    """Copy `state_dict` into `net` after checking every key and shape.

    With `reinit_class_head`, the class head (`class_embed`) keeps `net`'s fresh initialisation
    whatever the checkpoint holds, so weights trained on one label space can start fine-tuning
    on another. Raises BundleMismatchError listing missing, unexpected and mis-shaped keys.
    """
    state_dict = dict(state_dict)
    if reinit_class_head:
        own = net.state_dict()
        for key in [k for k in own if k.startswith(CLASS_HEAD_PREFIX)]:
            state_dict[key] = own[key]
    check_state_dict(net, state_dict)
    net.load_state_dict(state_dict, strict=True)


def check_state_dict(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise BundleMismatchError unless `state_dict` has exactly `net`'s keys and shapes."""
    problems = state_dict_mismatch(net, state_dict)
    if problems:
        raise BundleMismatchError(
            f"weights do not fit the configured architecture: {problems}; check that the "
            "config (preset, number of classes) matches the checkpoint")


def state_dict_mismatch(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """A summary of missing, unexpected and mis-shaped keys (a few of each), or None if none."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs expected {expected[k]}"
             for k in sorted(set(expected) & set(state_dict))
             if tuple(state_dict[k].shape) != expected[k]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{more})")
    return "; ".join(problems) or None


def _resolve(uri: str, filesystem: fsspec.AbstractFileSystem | None,
             ) -> tuple[fsspec.AbstractFileSystem, str]:
    if filesystem is None:
        return fsspec.core.url_to_fs(uri)
    return filesystem, filesystem._strip_protocol(uri)


def _read_manifest(manifest: Any, uri: str) -> Mask2FormerConfig:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{uri}/{CONFIG_FILE} is not a panoray bundle config "
                         f"(no \"format\": \"{FORMAT}\"); write bundles with save_bundle")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{uri} has bundle format version {version!r}, newer than the "
                         f"{FORMAT_VERSION} this panoray reads; upgrade panoray")
    try:
        return Mask2FormerConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{uri}/{CONFIG_FILE} has an invalid config: {err}") from None


def _config_of(net: nn.Module) -> Mask2FormerConfig:
    config = getattr(net, "config", None)
    if not isinstance(config, Mask2FormerConfig):
        raise TypeError(f"save_bundle needs a model built by build_model (with a .config), got "
                        f"{type(net).__name__}; unwrap DDP / compiled models first")
    return config


def _plain_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in net.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # tied weights or a view into a larger buffer
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out
