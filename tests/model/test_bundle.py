"""Model bundles: round trips (local and S3), model ids, and the errors users can hit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from model.bundle import (
    BundleError,
    BundleMismatchError,
    bundle_id,
    load_bundle,
    load_state_dict_into,
    read_bundle_config,
    save_bundle,
)
from model.config import get_config
from model.mask2former import build_model


def closed_loopback_endpoint() -> str:
    """An http endpoint on 127.0.0.1 nothing listens on: a request there is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def s3_uri_with_endpoint(s3_bucket, s3_server, monkeypatch) -> str:
    """A bundle URI on the moto server named only by its `?endpoint=` query: the environment's
    default endpoint is a closed loopback port, so a request that ignores the query fails fast
    (and never leaves the machine)."""
    closed = closed_loopback_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return f"s3://{s3_bucket}/models/tiny?endpoint={s3_server}"


@torch.no_grad()
def assert_same_outputs(a, b, images):
    """`a` is a model or its outputs on `images` (computed once per module for the tiny net)."""
    out_a, out_b = (a if isinstance(a, dict) else a(images)), b(images)
    assert torch.equal(out_a["pred_logits"], out_b["pred_logits"])
    assert torch.equal(out_a["pred_masks"], out_b["pred_masks"])


def test_local_round_trip_reproduces_outputs_and_config(tmp_path, tiny_net, tiny_outputs,
                                                        images):
    uri = str(tmp_path / "bundle")
    model_id = save_bundle(tiny_net, uri, name="tiny-test")
    loaded = load_bundle(uri)
    assert loaded.config == tiny_net.config
    assert not loaded.training
    assert_same_outputs(tiny_outputs, loaded, images)
    # Convolution weights keep the activations' channels_last layout after a load (no
    # per-call reorders); the bundle itself stores plain contiguous tensors.
    convs = [m for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                         for m in convs)
    assert loaded.model_id == model_id == tiny_net.model_id == bundle_id(uri)
    assert model_id.startswith("tiny-test@") and len(model_id.split("@")[1]) == 12
    manifest = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert manifest["name"] == "tiny-test" and manifest["format_version"] == 1
    assert [c["name"] for c in manifest["config"]["categories"]] == [
        c.name for c in tiny_net.config.categories]


def test_s3_round_trip(s3_bucket, tiny_net, tiny_outputs, images):
    uri = f"s3://{s3_bucket}/models/tiny"
    save_bundle(tiny_net, uri)
    loaded = load_bundle(uri)
    assert_same_outputs(tiny_outputs, loaded, images)
    assert loaded.model_id == bundle_id(uri)
    assert loaded.model_id.startswith("tiny@")


def test_s3_endpoint_query_is_honoured_by_every_door(s3_uri_with_endpoint, tiny_net,
                                                     tiny_outputs, images):
    uri = s3_uri_with_endpoint
    model_id = save_bundle(tiny_net, uri)
    info = read_bundle_config(uri)
    assert (info.name, info.config, info.model_id) == ("tiny", tiny_net.config, model_id)
    assert bundle_id(uri) == model_id
    loaded = load_bundle(uri)
    assert loaded.model_id == model_id
    assert_same_outputs(tiny_outputs, loaded, images)
    # The fixture is a real test: without the query the request goes to the closed port.
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        bundle_id(uri.split("?")[0])


def _count_weight_reads(monkeypatch, fs) -> list[str]:
    """Record the mode of every open of a model.safetensors on `fs` from now on."""
    reads: list[str] = []
    real_open = fs.open

    def counting_open(path, mode="rb", **kwargs):
        if str(path).endswith("model.safetensors"):
            reads.append(mode)
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(fs, "open", counting_open)
    return reads


def test_model_id_comes_from_config_json_and_weights_are_read_once(tiny_net, monkeypatch):
    memory = fsspec.filesystem("memory")
    uri = "memory://read-once/tiny"
    model_id = save_bundle(tiny_net, uri, filesystem=memory)
    sha256 = hashlib.sha256(memory.cat_file("/read-once/tiny/model.safetensors")).hexdigest()
    manifest = json.loads(memory.cat_file("/read-once/tiny/config.json"))
    assert manifest["weights_sha256"] == sha256 and model_id == f"tiny@{sha256[:12]}"
    reads = _count_weight_reads(monkeypatch, memory)
    assert read_bundle_config(uri, filesystem=memory).model_id == model_id
    assert bundle_id(uri, filesystem=memory) == model_id
    assert reads == []  # config.json alone names the weights
    assert load_bundle(uri, filesystem=memory).model_id == model_id
    assert reads == ["rb"]  # one read, hashed once, for the check and the id together


def test_bundles_without_a_recorded_hash_keep_their_model_id(tiny_net, monkeypatch):
    memory = fsspec.filesystem("memory")
    uri = "memory://old-format/tiny"
    model_id = save_bundle(tiny_net, uri, filesystem=memory)
    manifest = json.loads(memory.cat_file("/old-format/tiny/config.json"))
    del manifest["weights_sha256"]  # as written before config.json recorded it
    memory.pipe_file("/old-format/tiny/config.json", json.dumps(manifest).encode())
    reads = _count_weight_reads(monkeypatch, memory)
    assert bundle_id(uri, filesystem=memory) == model_id
    assert reads == ["rb"]  # hashed once, streaming
    assert load_bundle(uri, filesystem=memory).model_id == model_id


def test_weights_altered_after_saving_are_refused(tmp_path, tiny_net):
    uri = str(tmp_path / "altered")
    save_bundle(tiny_net, uri)
    weights = tmp_path / "altered" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor: still a valid file of the right shapes
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        load_bundle(uri)
    message = str(err.value)
    assert f"the weights of bundle {uri} were altered after it was saved" in message
    assert "\n" not in message and message.count(". ") == 0

    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated, e.g. an interrupted copy
    with pytest.raises(BundleError, match=f"the weights of bundle {uri} were altered"):
        load_bundle(uri)


def test_explicit_filesystem_is_used(tiny_net, tiny_outputs, images):
    import fsspec

    memory = fsspec.filesystem("memory")
    model_id = save_bundle(tiny_net, "memory://bundles/tiny", filesystem=memory)
    assert memory.exists("/bundles/tiny/model.safetensors")
    loaded = load_bundle("/bundles/tiny", filesystem=memory)
    assert loaded.model_id == model_id == bundle_id("memory://bundles/tiny", filesystem=memory)
    assert_same_outputs(tiny_outputs, loaded, images)


def test_model_id_is_stable_and_tracks_the_weights(tmp_path, tiny_net):
    first = save_bundle(tiny_net, str(tmp_path / "a"))
    again = save_bundle(load_bundle(str(tmp_path / "a")), str(tmp_path / "b"))
    assert first == again
    torch.manual_seed(123)
    other = build_model("tiny")
    assert save_bundle(other, str(tmp_path / "c")).split("@")[1] != first.split("@")[1]


def test_tied_weights_are_saved(tmp_path, images):
    torch.manual_seed(0)
    net = build_model("tiny")
    predictor = net.sem_seg_head.predictor
    predictor.query_embed.weight = predictor.query_feat.weight  # two keys, one storage
    save_bundle(net, str(tmp_path / "tied"))
    loaded = load_bundle(str(tmp_path / "tied"))
    assert torch.equal(loaded.sem_seg_head.predictor.query_embed.weight,
                       predictor.query_feat.weight)
    assert_same_outputs(net, loaded, images)


def test_missing_files_are_named(tmp_path, tiny_net):
    uri = str(tmp_path / "partial")
    save_bundle(tiny_net, uri)
    (tmp_path / "partial" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"partial is not a model bundle: model\.safe"):
        load_bundle(uri)
    with pytest.raises(FileNotFoundError, match="config.json, model.safetensors missing"):
        load_bundle(str(tmp_path / "nowhere"))


def test_config_weights_mismatch_lists_keys(tmp_path, tiny_net):
    uri = tmp_path / "mismatch"
    save_bundle(tiny_net, str(uri))
    manifest = json.loads((uri / "config.json").read_text())
    manifest["config"]["categories"] = manifest["config"]["categories"][:3]
    (uri / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleMismatchError, match=r"wrong shape \(sem_seg_head\.predictor\."
                                                  r"class_embed\.bias: \(9,\) vs expected \(4,\)"):
        load_bundle(str(uri))


def test_extra_and_missing_weights_are_reported(tmp_path, tiny_net):
    uri = tmp_path / "extra"
    save_bundle(tiny_net, str(uri))
    state = {k: v.contiguous() for k, v in tiny_net.state_dict().items()
             if not k.startswith("sem_seg_head.predictor.decoder_norm")}
    state["head.surprise"] = torch.zeros(2)
    save_file(state, str(uri / "model.safetensors"))
    with pytest.raises(BundleMismatchError) as err:
        load_bundle(str(uri))
    assert "2 missing (sem_seg_head.predictor.decoder_norm.bias" in str(err.value)
    assert "1 unexpected (head.surprise)" in str(err.value)


def test_bad_manifest_is_rejected(tmp_path, tiny_net):
    uri = tmp_path / "future"
    save_bundle(tiny_net, str(uri))
    manifest = json.loads((uri / "config.json").read_text())
    manifest["format_version"] = 99
    (uri / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="upgrade panoray"):
        load_bundle(str(uri))


def test_new_label_space_keeps_everything_but_the_class_head(tiny_net):
    cfg = get_config("tiny")
    small = dataclasses.replace(cfg, categories=cfg.categories[:3])
    torch.manual_seed(5)
    target = build_model(small)
    fresh_head = target.sem_seg_head.predictor.class_embed.weight.detach().clone()
    with pytest.raises(BundleMismatchError, match="class_embed"):
        load_state_dict_into(target, tiny_net.state_dict())
    load_state_dict_into(target, tiny_net.state_dict(), reinit_class_head=True)
    assert torch.equal(target.sem_seg_head.predictor.class_embed.weight, fresh_head)
    source = tiny_net.state_dict()
    for key, value in target.state_dict().items():
        if "class_embed" not in key:
            assert torch.equal(value, source[key]), key


def test_half_precision_storage_halves_the_file_and_loads_as_float32(tmp_path, tiny_net,
                                                                     tiny_outputs, images):
    save_bundle(tiny_net, str(tmp_path / "full"))
    save_bundle(tiny_net, str(tmp_path / "half"), storage_dtype=torch.float16)
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    half = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert half < 0.52 * full
    net = load_bundle(str(tmp_path / "half"))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    for key, value in net.state_dict().items():  # each weight is its float16 rounding
        expected = tiny_net.state_dict()[key]
        if expected.is_floating_point():
            assert torch.equal(value, expected.to(torch.float16).float()), key
    with torch.no_grad():
        out = net(images)
    torch.testing.assert_close(out["pred_logits"], tiny_outputs["pred_logits"],
                               atol=2e-2, rtol=2e-2)
