"""The GPU path proven without a GPU: the model on fake CUDA tensors.

`FakeTensorMode` runs every operator's shape / dtype / device rule without data, so the
forward, the loss and the backward run here on "cuda" tensors as they would on a GPU. CUDA
autocast is switched on with the low-level calls (`torch.autocast("cuda")` switches itself off
without a driver). A dispatch mode watches every operator the forward runs: none may make a
CPU tensor (other than a scalar operand), copy between host and device, or read a value back
to the host (`.item()`, data-dependent shapes: both raise under fake tensors anyway).

Models are built on the meta device (no initialisation arithmetic) and get fake CUDA
parameters, so even r50 and Swin-T cost about a second each.

The backward: PyTorch's autograd engine cannot run a fake CUDA graph without a driver (it asks
the driver about the device's context: `test_the_autograd_engine_needs_a_driver` pins that),
and neither can AOTAutograd's joint capture, which calls the engine. `run_backward` walks the
autograd graph itself instead, calling every node's backward with the engine's shape and dtype
rules, so each backward formula, the op's included, runs on fake CUDA as the engine would run
it; under `make_fx` that records the joint forward + backward graph.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import model.ops as ops
from model.criterion import LossConfig, build_criterion
from model.mask2former import build_model
from model.pixel_decoder import ConvNorm

PRESETS = ["tiny", "r50-coco-panoptic", "swin-t-coco-panoptic"]
AUTOCAST = [None, torch.bfloat16, torch.float16]  # None: plain float32
SIZE = (64, 96)  # small, not square, a multiple of 32
aten = torch.ops.aten
COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
          aten._copy_from_and_resize.default}

# The op's dtypes by design (model.pixel_decoder.op_dtype): float16 kept on CUDA, bfloat16
# sampling locations would be off by up to half a pixel on large maps, so float32 there.
OP_DTYPE = {None: torch.float32, torch.bfloat16: torch.float32, torch.float16: torch.float16}


@functools.cache
def _meta_model(preset: str) -> nn.Module:
    with torch.device("meta"):
        return build_model(preset)


def fake_cuda_model(preset: str, mode: FakeTensorMode) -> nn.Module:
    """The preset's model with `mode`'s fake CUDA parameters and buffers (same shapes and
    strides: the convolution weights stay channels_last). Call it outside the mode."""
    net = copy.deepcopy(_meta_model(preset))
    made: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            made[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
        return made[id(t)]

    with mode:
        for module in net.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = nn.Parameter(fake(p),
                                                            requires_grad=p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = fake(b)
    assert all(p.is_cuda for p in net.parameters()) and all(b.is_cuda for b in net.buffers())
    return net


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype | None):
    """CUDA autocast in `dtype` (None: off) without a driver; restores the previous state."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


class DeviceAudit(TorchDispatchMode):
    """Records every operator that would leave the device or synchronise with the host, and
    the dtypes the deformable attention op (forward and backward) receives."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.op_dtypes: dict[str, set[tuple[torch.dtype, ...]]] = {}
        self.op_calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # Indexing with integer tensors (Swin's relative position table) keeps its shape;
        # only boolean masks make it data-dependent.
        integer_index = func is aten.index.Tensor and not any(
            t.dtype in (torch.bool, torch.uint8) for t in inputs[1:])
        if (func is aten._local_scalar_dense.default
                or torch.Tag.data_dependent_output in func.tags
                or (torch.Tag.dynamic_output_shape in func.tags and not integer_index)):
            self.problems.append(f"{func}: reads values back to the host")
        if func in COPIES and any(not t.is_cuda for t in inputs):
            self.problems.append(f"{func}: copies from the host")
        if any(not t.is_cuda and t.dim() > 0 for t in inputs):
            self.problems.append(f"{func}: takes a host tensor")
        if func._schema.name.startswith("panoray::ms_deform_attn"):
            self.op_dtypes.setdefault(func._schema.name, set()).add(
                tuple(t.dtype for t in inputs if t.is_floating_point()))
            self.op_calls[func._schema.name] += 1
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_cuda:
                if func in COPIES or t.dim() > 0:
                    self.problems.append(f"{func}: makes a {t.device} tensor {tuple(t.shape)}")
        return out


def run_backward(loss: torch.Tensor) -> int:
    """`loss.backward()` without the autograd engine: call every node of the graph in
    dependency order, reducing and casting each gradient to its input's shape and dtype as the
    engine does (`validate_outputs`); leaves accumulate into `.grad`. Returns the node count."""
    root = loss.grad_fn
    waiting: dict = defaultdict(int)  # node -> edges into it not yet delivered
    stack, seen = [root], {root}
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is not None:
                waiting[nxt] += 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    buffers: dict = defaultdict(dict)  # node -> {input number: gradient}
    buffers[root][0] = torch.ones_like(loss)
    ready, calls = [root], 0
    while ready:
        node = ready.pop()
        given = buffers.pop(node)
        grads = [given.get(i) for i in range(len(node._input_metadata))]
        outs = node(*grads) if callable(node) else node.apply(*grads)  # C++ / Python nodes
        calls += 1
        for (nxt, number), grad in zip(node.next_functions, outs if isinstance(outs, tuple)
                                       else (outs,)):
            if nxt is None:
                continue
            if grad is not None:
                meta = nxt._input_metadata[number]
                assert grad.device == meta.device, (node, grad.device, meta.device)
                if tuple(grad.shape) != tuple(meta.shape):
                    grad = grad.sum_to_size(meta.shape)
                grad = grad.to(meta.dtype)
                buffers[nxt][number] = grad + buffers[nxt][number] if number in buffers[nxt] \
                    else grad
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    return calls


def _record_layer_dtypes(net: nn.Module) -> tuple[list[tuple[str, torch.dtype]], list]:
    """(name, output dtype) of every Linear / Conv2d call (a ConvNorm's conv: its norm's
    input), and the hook handles."""
    seen: list[tuple[str, torch.dtype]] = []
    handles = []
    for name, m in net.named_modules():
        if isinstance(m, ConvNorm):
            handles.append(m.norm.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.append((name, inp[0].dtype))))
        elif type(m) in (nn.Linear, nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.append((name, out.dtype))))
    return seen, handles


@pytest.fixture(autouse=True)
def _op_wrapper_treats_fake_inputs_as_real(monkeypatch):
    # ms_deform_attn skips its value checks for fake inputs; pretend they are real, so that a
    # forward asking for the checks (a read back to the host on CUDA) would fail here too.
    monkeypatch.setattr(ops, "_is_fake", lambda t: False)


def _check_forward(net, images, *, autocast, aux_outputs: bool) -> dict:
    """Run the forward under the audit; assert device, dtypes and no host traffic."""
    audit = DeviceAudit()
    seen, handles = _record_layer_dtypes(net)
    with cuda_autocast(autocast), audit:
        out = net(images, aux_outputs=aux_outputs)
    for h in handles:
        h.remove()
    assert audit.problems == []
    want = autocast or torch.float32
    # Every convolution and linear layer, pixel decoder included, ran in the autocast dtype.
    assert seen and {d for _, d in seen} == {want}, sorted({(n, d) for n, d in seen
                                                             if d != want})[:5]
    assert any(".pixel_decoder." in n for n, _ in seen)
    op = OP_DTYPE[autocast]
    assert audit.op_dtypes == {"panoray::ms_deform_attn": {(op, op, op)}}
    assert audit.op_calls == {"panoray::ms_deform_attn": net.config.pixel_decoder.num_layers}
    preds = [out, *out["aux_outputs"]]
    assert len(out["aux_outputs"]) == (net.config.transformer_decoder.num_layers
                                       if aux_outputs else 0)
    for pred in preds:
        for key in ("pred_logits", "pred_masks"):
            assert pred[key].device.type == "cuda" and pred[key].dtype == want, key
    cfg = net.config
    assert out["pred_logits"].shape == (images.shape[0], cfg.transformer_decoder.num_queries,
                                        cfg.num_classes + 1)
    assert out["pred_masks"].shape[-2:] == (SIZE[0] // 4, SIZE[1] // 4)
    return out


@pytest.mark.parametrize("autocast", AUTOCAST, ids=["float32", "bf16-autocast", "fp16-autocast"])
@pytest.mark.parametrize("preset", PRESETS)
def test_inference_forward_stays_on_the_device(preset, autocast):
    mode = FakeTensorMode()
    net = fake_cuda_model(preset, mode)
    with mode:
        net.eval()
        images = torch.empty(2, 3, *SIZE, device="cuda")
        with torch.inference_mode():
            _check_forward(net, images, autocast=autocast, aux_outputs=False)


def _fake_targets(batch: int, num_classes: int, counts=(2, 1)) -> tuple[list[dict], list]:
    """Targets on the device and the matches the host step (`SetCriterion.match`) would give:
    int64 CPU index tensors, as scipy's assignment comes back."""
    targets = [{"labels": torch.randint(0, num_classes, (n,), device="cuda"),
                "masks": torch.zeros(n, *SIZE, dtype=torch.bool, device="cuda")}
               for n in counts[:batch]]
    matches = [(torch.arange(n), torch.arange(n)) for n in counts[:batch]]
    return targets, matches


# The training step under the two autocast dtypes the training loop uses: bfloat16 (the op
# gets float32 both ways) and float16 (16-bit both ways; tiny's float16 step is also
# `test_float16_training_step_with_grad_scaler`). Plain float32 training is the CPU tests'
# (tests/model/test_model.py). Swin-T's training forward (drop path on) and loss run in
# `make test`; its backward (about 9 s more, mostly torchvision's own ops, whose backward the CPU
# tests run) in `make test-slow`.
TRAINING = [("tiny", torch.bfloat16, True), ("r50-coco-panoptic", torch.float16, True),
            ("swin-t-coco-panoptic", torch.bfloat16, False),
            pytest.param("swin-t-coco-panoptic", torch.bfloat16, True, marks=pytest.mark.slow)]


def _training_id(case) -> str:
    preset, autocast, backward = case.values if hasattr(case, "values") else case
    return f"{preset}-{str(autocast)[6:]}{'' if backward else '-forward-and-loss'}"


@pytest.mark.parametrize(("preset", "autocast", "backward"), TRAINING,
                         ids=[_training_id(c) for c in TRAINING])
def test_training_forward_loss_and_backward_on_the_device(preset, autocast, backward):
    mode = FakeTensorMode()
    net = fake_cuda_model(preset, mode)
    with mode:
        net.train()
        cfg = net.config
        images = torch.empty(2, 3, *SIZE, device="cuda")
        out = _check_forward(net, images, autocast=autocast, aux_outputs=True)

        criterion = build_criterion(LossConfig(num_points=256), num_classes=cfg.num_classes)
        criterion = criterion.to("cuda")
        targets, matches = _fake_targets(2, cfg.num_classes)
        layers = 1 + len(out["aux_outputs"])
        with cuda_autocast(autocast):  # as the training loop runs the loss
            losses = criterion(out, targets, num_masks=3.0, matches=[matches] * layers)
            total = criterion.total_loss(losses)
        assert len(losses) == 3 * layers
        for name, value in losses.items():
            assert value.device.type == "cuda" and value.dtype == torch.float32, name
            assert value.dim() == 0, name
        if not backward:
            return
        audit = DeviceAudit()
        with audit:
            assert run_backward(total) > 100
        assert audit.problems == []
        op = OP_DTYPE[autocast]
        # The backward gets the forward's dtypes (grad_output, value, locations, weights).
        assert audit.op_dtypes == {"panoray::ms_deform_attn_backward": {(op,) * 4}}
        assert audit.op_calls == {"panoray::ms_deform_attn_backward": cfg.pixel_decoder.num_layers}
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        assert trainable
        for name, p in trainable:
            assert p.grad is not None, name
            assert p.grad.device.type == "cuda" and p.grad.dtype == torch.float32, name


def _tiny_training_on_fake_cuda():
    """(mode, tiny in train mode on fake CUDA, its criterion there)."""
    mode = FakeTensorMode()
    net = fake_cuda_model("tiny", mode)
    with mode:
        net.train()
        criterion = build_criterion(LossConfig(num_points=256),
                                    num_classes=net.config.num_classes).to("cuda")
    return mode, net, criterion


def test_float16_training_step_with_grad_scaler(monkeypatch):
    """The float16 recipe (`pipeline.train.loop`): the audited forward, scaled backward,
    unscale, clip, update; all on the device. Only `scaler.step` reads back (whether to skip
    the update): GradScaler's one read per step, outside the model, which a fake trace cannot
    go past."""
    from model.optim import clip_grad_norm

    # GradScaler("cuda") switches itself off without a driver, as autocast does.
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    mode, net, criterion = _tiny_training_on_fake_cuda()
    with mode:
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda")
        assert scaler.is_enabled()
        images = torch.empty(2, 3, *SIZE, device="cuda")
        targets, matches = _fake_targets(2, net.config.num_classes)
        out = _check_forward(net, images, autocast=torch.float16, aux_outputs=True)
        layers = 1 + len(out["aux_outputs"])
        with cuda_autocast(torch.float16):
            total = criterion.total_loss(criterion(out, targets, num_masks=3.0,
                                                   matches=[matches] * layers))
        audit = DeviceAudit()
        with audit:
            scaled = scaler.scale(total)
            run_backward(scaled)
            scaler.unscale_(optimizer)
            norm = clip_grad_norm(net.parameters(), max_norm=0.01)
        assert audit.problems == []
        assert scaled.is_cuda and norm.is_cuda
        found_inf = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        assert [t.device.type for t in found_inf.values()] == ["cuda"]
        assert audit.op_dtypes == {"panoray::ms_deform_attn_backward": {(torch.float16,) * 4}}
        assert all(p.grad.is_cuda and p.grad.dtype == torch.float32
                   for p in net.parameters() if p.requires_grad)
        with pytest.raises(DataDependentOutputException, match="_local_scalar_dense"):
            scaler.step(optimizer)  # `found_inf.item()`: the host decides to skip or step
        audit = DeviceAudit()
        with audit:
            scaler.update()  # the next scale, on the device
        assert audit.problems == [] and scaler._scale.is_cuda


def test_make_fx_records_the_joint_training_graph():
    """make_fx records forward + loss + backward as one aten graph on fake CUDA tensors, under
    float16 autocast: every tensor in it on the device, the op's forward and backward in
    float16, 16-bit matmuls (autocast recorded, not lost), float32 gradients for the float32
    weights."""
    from torch.fx.experimental.proxy_tensor import make_fx

    autocast = torch.float16
    mode, net, criterion = _tiny_training_on_fake_cuda()
    with mode:
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        images = torch.empty(2, 3, *SIZE, device="cuda")
        targets, matches = _fake_targets(2, net.config.num_classes)

        def step(params, images, labels, masks, matches, num_masks):
            params = [p.detach().requires_grad_() for p in params]
            targets = [{"labels": lb, "masks": m} for lb, m in zip(labels, masks)]
            with cuda_autocast(autocast):
                out = torch.func.functional_call(net, dict(zip(names, params)), (images,))
                layers = 1 + len(out["aux_outputs"])
                total = criterion.total_loss(criterion(out, targets, num_masks=num_masks,
                                                       matches=[matches] * layers))
            run_backward(total)
            return total.detach(), [p.grad for p in params]

        graph = make_fx(step)([p for _, p in named], images, [t["labels"] for t in targets],
                              [t["masks"] for t in targets], matches,
                              torch.full((), 3.0, device="cuda"))
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    called = {str(n.target) for n in nodes}
    assert {"panoray.ms_deform_attn.default",
            "panoray.ms_deform_attn_backward.default"} <= called
    op = OP_DTYPE[autocast]
    for n in nodes:
        if str(n.target).startswith("panoray."):
            floats = {a.meta["val"].dtype for a in n.args
                      if isinstance(a, torch.fx.Node) and a.meta["val"].is_floating_point()}
            assert floats == {op}, (n, floats)
    # The linear and convolution layers, both ways. (Not bmm: without a driver attention
    # takes SDPA's math path, which computes 16-bit inputs in float32; a GPU takes flash.)
    matmuls = [n for n in nodes if n.target in (aten.mm.default, aten.addmm.default,
                                                aten.convolution.default,
                                                aten.convolution_backward.default)]
    assert len(matmuls) > 100
    assert {v.dtype for n in matmuls for v in tree_leaves(n.meta["val"])
            if isinstance(v, torch.Tensor)} == {autocast}
    # Off the device: only the host step's match indices (graph inputs) and scalars.
    host = [n for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)
            and not n.meta["val"].is_cuda and n.meta["val"].dim() > 0]
    assert host == []
    total, *grads = next(n for n in graph.graph.nodes if n.op == "output").args[0]  # flat
    assert total.meta["val"].is_cuda and total.meta["val"].dtype == torch.float32
    assert len(grads) == len(named) and all(isinstance(g, torch.fx.Node) for g in grads)
    assert all(g.meta["val"].is_cuda and g.meta["val"].dtype == torch.float32 for g in grads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a driver is present: the engine runs "
                    "fake CUDA graphs there, and the tests above could use it")
def test_the_autograd_engine_needs_a_driver():
    """Why `run_backward` exists: without a CUDA driver the engine (and with it AOTAutograd's
    joint capture) refuses a fake CUDA graph. When a PyTorch release lifts that, this fails:
    then use `loss.backward()` and AOTAutograd's joint graph directly."""
    from torch._functorch.aot_autograd import aot_function

    with FakeTensorMode():
        w = torch.empty(3, device="cuda", requires_grad=True)
        with pytest.raises(RuntimeError, match="hasPrimaryContext"):
            (w * 2).sum().backward()
        with pytest.raises(RuntimeError, match="hasPrimaryContext"):
            aot_function(lambda x: (x * 2).sum(), fw_compiler=lambda gm, _: gm.forward)(w)
