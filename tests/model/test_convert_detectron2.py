"""detectron2 .pkl import: the restricted unpickler, key mapping, and shape checks."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

from model.bundle import BundleMismatchError
from model.config import PRESETS, BackboneConfig, get_config
from model.convert_detectron2 import (
    UnsafeCheckpointError,
    convert_detectron2,
    detectron2_key_map,
    export_detectron2,
    ours_key_to_detectron2,
    read_detectron2_pickle,
    to_detectron2_state_dict,
)
from model.mask2former import build_model

MARKER_ENV = "PANORAY_TEST_MARKER"


class WritesMarker:
    """Unpickling this calls `_touch(path)`: a stand-in for code a hostile pickle would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("ran")


class RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class SetsState:
    """A custom class whose __setstate__ would run on load."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setstate__(self, state):  # pragma: no cover - must never run
        _touch(state["path"])


def write_pickle(path, payload, protocol=4):
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    return str(path)


@pytest.mark.parametrize("make", [
    lambda marker: {"model": {"w": np.zeros(3)}, "evil": WritesMarker(marker)},
    lambda marker: {"model": {"w": RunsShell(f"touch {marker}")}},
    lambda marker: [np.zeros(2), {"deep": (1, SetsState(marker))}],
], ids=["reduce-to-function", "os-system", "custom-setstate"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, make, protocol):
    marker = tmp_path / "marker"
    src = write_pickle(tmp_path / "evil.pkl", make(str(marker)), protocol)
    with pytest.raises(UnsafeCheckpointError, match=r"refers to [\w.]+\.(_touch|system|SetsState)"):
        read_detectron2_pickle(src)
    assert not marker.exists(), "unpickling ran code"


def test_error_names_the_refused_global(tmp_path):
    src = write_pickle(tmp_path / "eval.pkl", {"model": RunsShell("true")})
    with pytest.raises(UnsafeCheckpointError) as err:
        read_detectron2_pickle(src)
    assert f"{os.system.__module__}.system" in str(err.value)


def test_plain_data_and_legacy_numpy_names_load(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5)}
    blob = pickle.dumps({"model": arrays, "__author__": "someone"}, protocol=2)
    assert b"numpy._core.multiarray" in blob
    # numpy 1.x (which wrote the model zoo files) names the module numpy.core.multiarray.
    legacy = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "legacy.pkl").write_bytes(legacy)
    loaded = read_detectron2_pickle(str(tmp_path / "legacy.pkl"))
    assert np.array_equal(loaded["a"], arrays["a"]) and loaded["a"].dtype == np.float32
    assert float(loaded["b"]) == 2.5


def test_every_preset_maps_to_distinct_reference_names():
    for name in PRESETS:
        with torch.device("meta"):
            net = build_model(name)
        key_map = detectron2_key_map(net)
        assert sorted(key_map.values()) == sorted(net.state_dict()), f"{name}: names collide"
        backbone = {k.split(".")[1] for k in key_map if k.startswith("backbone.")}
        expected = ({"stem", "res2", "res3", "res4", "res5"} if "swin" not in name else
                    {"patch_embed", "layers", "norm0", "norm1", "norm2", "norm3"})
        assert backbone == expected, name


def test_reference_layout_names():
    assert ours_key_to_detectron2("backbone.layer1.0.bn2.running_var") == \
        "backbone.res2.0.conv2.norm.running_var"
    assert ours_key_to_detectron2("backbone.layer4.0.downsample.1.weight") == \
        "backbone.res5.0.shortcut.norm.weight"
    assert ours_key_to_detectron2("backbone.bn1.bias") == "backbone.stem.conv1.norm.bias"
    assert ours_key_to_detectron2("sem_seg_head.pixel_decoder.adapter_1.norm.weight") == \
        "sem_seg_head.pixel_decoder.adapter_1.norm.weight"
    with torch.device("meta"):
        swin = detectron2_key_map(build_model("swin-t-coco-panoptic"))
    assert swin["backbone.layers.2.blocks.5.mlp.fc2.weight"] == "backbone.features.5.5.mlp.3.weight"
    assert swin["backbone.layers.1.downsample.reduction.weight"] == \
        "backbone.features.4.reduction.weight"
    assert swin["backbone.layers.3.blocks.1.attn.relative_position_bias_table"] == \
        "backbone.features.7.1.attn.relative_position_bias_table"
    assert swin["backbone.patch_embed.norm.bias"] == "backbone.features.0.2.bias"


@pytest.mark.parametrize("protocol", [2, 4])
def test_exported_tiny_model_imports_and_reproduces_outputs(tmp_path, tiny_net, tiny_outputs,
                                                           images, protocol):
    arrays = to_detectron2_state_dict(tiny_net)
    assert "backbone.res2.0.conv1.weight" in arrays
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    # What a real model-zoo file also carries, and the importer must skip.
    arrays["criterion.empty_weight"] = np.ones(len(tiny_net.config.categories) + 1, np.float32)
    arrays["pixel_mean"] = np.zeros(3, np.float32)
    src = write_pickle(tmp_path / "model_final.pkl",
                       {"model": arrays, "__author__": "test", "matching_heuristics": True},
                       protocol)
    config, state_dict = convert_detectron2(src, preset="tiny")
    assert config == tiny_net.config
    net = build_model(config)
    net.load_state_dict(state_dict)
    with torch.no_grad():
        want, got = tiny_outputs, net(images)
    assert torch.equal(want["pred_logits"], got["pred_logits"])
    assert torch.equal(want["pred_masks"], got["pred_masks"])


def test_small_swin_round_trips_and_skips_derived_buffers(tmp_path, images):
    swin = BackboneConfig(kind="swin", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                          window_size=4)
    config = dataclasses.replace(get_config("tiny"), name="tiny-swin", backbone=swin)
    torch.manual_seed(0)
    source = build_model(config)
    arrays = to_detectron2_state_dict(source)
    assert "backbone.layers.3.blocks.1.mlp.fc1.weight" in arrays
    # Reference Swin checkpoints also hold this derived buffer; it must be skipped.
    arrays["backbone.layers.0.blocks.0.attn.relative_position_index"] = np.zeros((16, 16),
                                                                                 np.int64)
    src = write_pickle(tmp_path / "swin.pkl", {"model": arrays, "__author__": "test"})
    _, state_dict = convert_detectron2(src, preset=config)
    net = build_model(config)
    net.load_state_dict(state_dict)
    with torch.no_grad():
        assert torch.equal(source(images)["pred_masks"], net(images)["pred_masks"])


def test_bare_dict_of_arrays_is_accepted(tmp_path, tiny_net):
    src = tmp_path / "bare.pkl"
    export_detectron2(tiny_net, str(src))
    payload = pickle.loads(src.read_bytes())
    write_pickle(src, payload["model"])
    _, state_dict = convert_detectron2(str(src), preset="tiny")
    reference = tiny_net.state_dict()
    assert state_dict.keys() == reference.keys()
    assert all(torch.equal(state_dict[k], reference[k]) for k in reference)


@pytest.mark.parametrize("key, array, message", [
    ("sem_seg_head.predictor.query_feat.weight", np.zeros((7, 64), np.float32),
     r"does not fit preset 'tiny'.*query_feat\.weight: \(7, 64\)"),
    ("sem_seg_head.predictor.extra_head.weight", np.zeros(3, np.float32),
     r"1 unexpected \(sem_seg_head\.predictor\.extra_head\.weight\)"),
], ids=["wrong-shape", "unknown-key"])
def test_weights_that_do_not_fit_name_the_key_and_preset(tmp_path, tiny_net, key, array, message):
    arrays = to_detectron2_state_dict(tiny_net)
    arrays[key] = array
    src = write_pickle(tmp_path / "bad.pkl", {"model": arrays, "__author__": "test"})
    with pytest.raises(BundleMismatchError, match=message):
        convert_detectron2(src, preset="tiny")


def test_checkpoint_for_another_architecture_is_rejected(tmp_path, tiny_net):
    src = tmp_path / "tiny.pkl"
    export_detectron2(tiny_net, str(src))
    with pytest.raises(BundleMismatchError, match="does not fit preset 'r50-coco-panoptic'"):
        convert_detectron2(str(src), preset="r50-coco-panoptic")


def test_non_array_entries_are_rejected(tmp_path):
    src = write_pickle(tmp_path / "odd.pkl", {"model": {"w": "not an array"}})
    with pytest.raises(ValueError, match="entry 'w' is a str, not a numeric array"):
        read_detectron2_pickle(src)
    src = write_pickle(tmp_path / "objects.pkl", {"w": np.array([1, "x"], dtype=object)})
    with pytest.raises(ValueError, match="entry 'w' is an array of dtype object"):
        read_detectron2_pickle(src)


def test_reads_from_s3(s3_bucket, tiny_net):
    import fsspec

    uri = f"s3://{s3_bucket}/ckpt/model_final.pkl"
    export_detectron2(tiny_net, uri)
    with fsspec.open(uri, "rb") as f:
        assert f.read(1) == b"\x80"  # a pickle
    _, state_dict = convert_detectron2(uri, preset="tiny")
    assert torch.equal(state_dict["backbone.conv1.weight"], tiny_net.state_dict()[
        "backbone.conv1.weight"])
