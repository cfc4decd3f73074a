"""The whole model compiled: `torch.compile(fullgraph=True)` of the inference forward and of the
training forward + loss, and `torch.export` of the inference forward, against eager.

The backend is "aot_eager": Dynamo's one graph through AOTAutograd (the forward and backward
graphs inductor would get, the op traced through its fake kernels), run by eager kernels.
Inductor's own code generation takes minutes on 2 cores for the tiny model;
`bench/compile.py` measures it and what it buys. Tiny preset, 64 x 64 images.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._subclasses.fake_tensor import FakeTensorMode

from model import pixel_decoder, position_encoding
from model.criterion import LossConfig, build_criterion
from model.mask2former import build_model

OP = "panoray.ms_deform_attn.default"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("tiny")


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255


class Recorder:
    """A torch.compile backend: keeps every Dynamo graph, then runs it with aot_eager."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def calls(self, target: str) -> int:
        return sum(str(n.target) == target for g in self.graphs for n in g.graph.nodes)


def _assert_same(a: dict, b: dict, **tol) -> None:
    for pred_a, pred_b in zip([a, *a["aux_outputs"]], [b, *b["aux_outputs"]], strict=True):
        torch.testing.assert_close(pred_a["pred_logits"], pred_b["pred_logits"], **tol)
        torch.testing.assert_close(pred_a["pred_masks"], pred_b["pred_masks"], **tol)


def test_inference_forward_compiles_to_one_graph_equal_to_eager(net, images):
    """Once failed: the position embedding's cache asked `torch.is_inference_mode_enabled()`,
    which Dynamo cannot trace (15 graph breaks, and an error with fullgraph=True)."""
    torch._dynamo.reset()
    backend = Recorder()
    compiled = torch.compile(net, fullgraph=True, backend=backend)
    with torch.inference_mode():
        expected = net(images, aux_outputs=False)
        out = compiled(images, aux_outputs=False)
        again = compiled(images, aux_outputs=False)
    assert len(backend.graphs) == 1  # one graph, and no recompilation on the second call
    assert backend.calls(OP) == net.config.pixel_decoder.num_layers
    assert out["aux_outputs"] == []
    _assert_same(out, expected, atol=1e-5, rtol=1e-5)
    _assert_same(again, expected, atol=1e-5, rtol=1e-5)


def _targets(num_classes: int, size: int, counts=(3, 1)) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    targets = []
    for n in counts:
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for m in masks:
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            m[y:y + size // 3, x:x + size // 3] = True
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                        "masks": masks})
    return targets


def test_training_forward_and_loss_compile_to_one_graph_equal_to_eager(net, images):
    """The matching (scipy, on the host) runs eagerly first (`SetCriterion.match`); forward +
    loss then compile to one graph, whose loss and gradients equal eager's. (The loss of the
    last layer only: every layer's loss is the same code, and each costs ~2 s of tracing.)"""
    train_net = copy.deepcopy(net).train()
    criterion = build_criterion(LossConfig(num_points=256, deep_supervision=False),
                                num_classes=net.config.num_classes)
    targets = _targets(net.config.num_classes, images.shape[-1])
    with torch.no_grad():
        matches = criterion.match(train_net(images), targets)

    def step(images, targets, matches):
        losses = criterion(train_net(images), targets, num_masks=4.0, matches=matches)
        return criterion.total_loss(losses), losses

    def run(fn):
        train_net.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the loss's random points
        total, losses = fn(images, targets, matches)
        total.backward()
        return total.detach(), losses, {n: p.grad for n, p in train_net.named_parameters()}

    torch._dynamo.reset()
    backend = Recorder()
    total_c, losses_c, grads_c = run(torch.compile(step, fullgraph=True, backend=backend))
    total_e, losses_e, grads_e = run(step)
    assert len(backend.graphs) == 1
    assert backend.calls(OP) == net.config.pixel_decoder.num_layers
    assert set(losses_c) == set(losses_e) == {"loss_ce", "loss_mask", "loss_dice"}
    torch.testing.assert_close(total_c, total_e, atol=1e-5, rtol=1e-5)
    for name in losses_e:
        torch.testing.assert_close(losses_c[name], losses_e[name], atol=1e-5, rtol=1e-5)
    assert grads_e["backbone.conv1.weight"].abs().sum() > 0
    for name, grad in grads_e.items():
        if grad is None:
            assert grads_c[name] is None, name
        else:
            torch.testing.assert_close(grads_c[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_export_of_the_inference_forward_runs_like_eager(net, images):
    """torch.export traces the forward through the op's fake kernel; the exported program
    gives eager's answer, and tracing left no fake tensor in the per-size caches."""
    with torch.no_grad():
        expected = net(images, aux_outputs=False)
    program = torch.export.export(net, (images,), {"aux_outputs": False})
    calls = [n for n in program.graph.nodes if str(n.target) == OP]
    assert len(calls) == net.config.pixel_decoder.num_layers
    with torch.no_grad():
        out = program.module()(images, aux_outputs=False)
        after = net(images, aux_outputs=False)
    _assert_same(out, expected, atol=1e-5, rtol=1e-5)
    _assert_same(after, expected, atol=0, rtol=0)


def test_tracing_leaves_the_per_size_caches_alone(net):
    """A fake (traced) forward at a new size caches nothing; the eager one after it does."""
    caches = (position_encoding._embedding, pixel_decoder._level_tensors)
    before = [c.cache_info().currsize for c in caches]
    images = torch.rand(1, 3, 96, 160) * 255  # a size no other test uses
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():
        fake_out = net(mode.from_tensor(images), aux_outputs=False)
    assert isinstance(fake_out["pred_masks"], torch._subclasses.fake_tensor.FakeTensor)
    assert [c.cache_info().currsize for c in caches] == before
    with torch.no_grad():
        out = net(images, aux_outputs=False)  # would fail on a cached fake tensor
    assert not isinstance(out["pred_masks"], torch._subclasses.fake_tensor.FakeTensor)
    assert [c.cache_info().currsize for c in caches] > before


def test_one_cache_entry_serves_inference_and_training(net):
    """The caches hold normal tensors even when filled under inference_mode, so a training
    step at the same size back-propagates through them."""
    images = torch.rand(1, 3, 64, 96) * 255
    with torch.inference_mode():
        net(images, aux_outputs=False)
    pos = position_encoding.sine_position_embedding(2, 3, 32, device="cpu",
                                                    dtype=torch.float32)
    assert not pos.is_inference()
    train_net = copy.deepcopy(net).train()
    out = train_net(images)
    (out["pred_masks"].mean() + out["pred_logits"].mean()).backward()
    grad = train_net.sem_seg_head.predictor.level_embed.weight.grad
    assert grad is not None and grad.abs().sum() > 0
