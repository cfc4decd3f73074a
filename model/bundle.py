"""Model bundles: a folder at any URI holding `config.json` and `model.safetensors`.

The one door to bundles: reading the config (with the format checks), loading, saving and the
`model_id` all live here, and every URI goes through `model.storage`, so
`s3://bucket/m?endpoint=http://127.0.0.1:9000` works wherever a local path does.

    save_bundle(net, "s3://bucket/models/coco-r50")         # local paths work the same
    net = load_bundle("s3://bucket/models/coco-r50")        # refuses altered weights
    net.model_id                                            # "coco-r50@3f2a9c0d41b7"
    info = read_bundle_config("s3://bucket/models/coco-r50")  # reads config.json only
    info.name, info.config, info.model_id

`config.json` holds the format version, the bundle name, the SHA-256 of `model.safetensors` and
the full `Mask2FormerConfig` (architecture + label space), so the folder alone rebuilds the
model. The `model_id` names the bundle and the exact weights (the first 12 hex digits of that
SHA-256); output rows carry it so a result can always be traced to the weights that produced
it. Bundles written before the hash was recorded still read: their weights are hashed once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
from safetensors import SafetensorError

from model.config import Mask2FormerConfig
from model.storage import filesystem_for, join, shown_uri

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported by the functions that touch weights: reading a bundle's config (all a
# segment job's driver does with it) costs no import of torch.

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "panoray-bundle"
FORMAT_VERSION = 1
# config.json's record of the weights (hex SHA-256 of model.safetensors); absent in old bundles.
SHA256_KEY = "weights_sha256"
_HASH_CHARS = 12
# Parameters whose shape depends on the number of classes (re-initialised for a new label space).
CLASS_HEAD_PREFIX = "sem_seg_head.predictor.class_embed."


class BundleError(ValueError):
    """A folder that is not a usable model bundle (format, config or weights)."""


class BundleMismatchError(BundleError):
    """Weights that do not fit the architecture described by the config."""


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle's config.json says, read without loading the weights."""

    name: str
    config: Mask2FormerConfig
    model_id: str  # "name@<first 12 hex digits of sha256(model.safetensors)>"


def save_bundle(net: nn.Module, uri: str, *, name: str | None = None,
                storage_dtype: torch.dtype | None = None,
                filesystem: fsspec.AbstractFileSystem | None = None) -> str:
    """Write `net` (a Mask2Former with a `.config`) as a bundle folder at `uri`.

    Overwrites an existing bundle there. Sets and returns `net.model_id`. `storage_dtype`
    (e.g. torch.float16): the floating-point weights are stored in it, halving the file;
    `load_bundle` copies them into the model's float32 parameters. `filesystem`: an fsspec
    filesystem to use instead of the one `uri` implies (e.g. with custom credentials).
    """
    from safetensors.torch import save as save_safetensors

    config = _config_of(net)
    name = name or config.name
    state = _plain_state_dict(net)
    if storage_dtype is not None:
        state = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in state.items()}
    weights = save_safetensors(state, metadata={"format": "pt"})
    sha256 = hashlib.sha256(weights).hexdigest()  # recorded, so readers need not hash again
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
                SHA256_KEY: sha256, "config": config.to_dict()}
    fs, root = _resolve(uri, filesystem)
    fs.makedirs(root, exist_ok=True)
    # Weights first: a reader never sees a config.json beside missing or stale weights
    # of a fresh bundle.
    with fs.open(join(root, WEIGHTS_FILE), "wb") as f:
        f.write(weights)
    with fs.open(join(root, CONFIG_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    net.model_id = _model_id(name, sha256)
    return net.model_id


def read_bundle_config(uri: str, *,
                       filesystem: fsspec.AbstractFileSystem | None = None) -> BundleInfo:
    """The name, config and `model_id` of the bundle at `uri`, without loading the weights.

    Reads config.json only (and checks that the weights file is there); a bundle written before
    config.json recorded the weights' SHA-256 has its weights hashed once, streaming.
    """
    fs, root = _resolve(uri, filesystem)
    manifest, config = _read_config(fs, root, uri)
    sha256 = manifest.get(SHA256_KEY) or _hash_file(fs, join(root, WEIGHTS_FILE))
    return BundleInfo(name=manifest["name"], config=config,
                      model_id=_model_id(manifest["name"], sha256))


def load_bundle(uri: str, *, map_location: str | torch.device = "cpu",
                filesystem: fsspec.AbstractFileSystem | None = None) -> nn.Module:
    """Rebuild the model saved at `uri`, in eval mode, with `model_id` and `bundle_name` set.

    The weights are read and hashed once; weights whose SHA-256 is not the one config.json
    records (altered or damaged after saving) are refused with a BundleError.
    """
    from safetensors.torch import load as load_safetensors

    from model.mask2former import build_model

    fs, root = _resolve(uri, filesystem)
    manifest, config = _read_config(fs, root, uri)
    with fs.open(join(root, WEIGHTS_FILE), "rb") as f:
        weights = f.read()
    sha256 = hashlib.sha256(weights).hexdigest()
    altered = manifest.get(SHA256_KEY) not in (None, sha256)
    try:
        state_dict = load_safetensors(weights)
    except SafetensorError as err:
        if altered:
            raise _altered_error(uri) from None
        raise BundleError(f"{shown_uri(uri)}/{WEIGHTS_FILE} is not a readable safetensors file "
                          f"({err}); save or convert the bundle again") from None
    net = build_model(config)
    try:
        # Before the hash check: weights that do not fit say which keys are wrong.
        load_state_dict_into(net, state_dict)
    except BundleMismatchError as err:
        raise BundleMismatchError(f"bundle {shown_uri(uri)}: {err}") from None
    if altered:
        raise _altered_error(uri)
    net.to(map_location).eval()
    net.bundle_name = manifest["name"]
    net.model_id = _model_id(manifest["name"], sha256)
    return net


def bundle_id(uri: str, *, filesystem: fsspec.AbstractFileSystem | None = None) -> str:
    """The `model_id` of the bundle at `uri` ("name@hash"), without loading the weights."""
    return read_bundle_config(uri, filesystem=filesystem).model_id


def make_model_id(name: str, weights: bytes) -> str:
    """`name@<first 12 hex digits of sha256(weights)>`."""
    return _model_id(name, hashlib.sha256(weights).hexdigest())


def _model_id(name: str, sha256: str) -> str:
    return f"{name}@{sha256[:_HASH_CHARS]}"


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
    """(filesystem, path of the bundle folder in it): the storage door's, endpoint included."""
    if filesystem is None:
        return filesystem_for(uri)
    return filesystem, filesystem._strip_protocol(uri)


def _read_config(fs: fsspec.AbstractFileSystem, root: str,
                 uri: str) -> tuple[dict[str, Any], Mask2FormerConfig]:
    """(config.json as a dict, its checked config) of the bundle folder `root` (from `uri`)."""
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not fs.exists(join(root, n))]
    if missing:
        raise FileNotFoundError(f"{shown_uri(uri)} is not a model bundle: {', '.join(missing)} "
                                "missing; write one with save_bundle or `panoray convert`")
    with fs.open(join(root, CONFIG_FILE), "r") as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as err:
            raise BundleError(f"{shown_uri(uri)}/{CONFIG_FILE} is not JSON ({err}); write "
                              "bundles with save_bundle") from None
    return manifest, _read_manifest(manifest, shown_uri(uri))


def _read_manifest(manifest: Any, uri: str) -> Mask2FormerConfig:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{uri}/{CONFIG_FILE} is not a panoray bundle config "
                          f"(no \"format\": \"{FORMAT}\"); write bundles with save_bundle")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{uri} has bundle format version {version!r}, newer than the "
                          f"{FORMAT_VERSION} this panoray reads; upgrade panoray")
    if not isinstance(manifest.get("name"), str) or not manifest["name"]:
        raise BundleError(f"{uri}/{CONFIG_FILE} has no bundle name; write bundles with "
                          "save_bundle")
    sha256 = manifest.get(SHA256_KEY)
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
        raise BundleError(f"{uri}/{CONFIG_FILE} has an invalid {SHA256_KEY} {sha256!r} (not 64 "
                          "hex digits); save or convert the bundle again")
    try:
        return Mask2FormerConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{uri}/{CONFIG_FILE} has an invalid config: {err}") from None


def _hash_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Hex SHA-256 of the file at `path`, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _altered_error(uri: str) -> BundleError:
    return BundleError(f"the weights of bundle {shown_uri(uri)} were altered after it was saved "
                       f"(their SHA-256 is not the one its {CONFIG_FILE} records); save or "
                       "convert the bundle again")


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
