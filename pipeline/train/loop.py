"""The per-worker training loop of `pipeline.train.job.run_finetune`, and its checkpoints.

Each worker reads its shard of the LSJ example stream (`pipeline.train.data`) through
`ray.train.get_dataset_shard("train")`, runs the model under DDP (`prepare_model`: gloo on CPU,
NCCL on GPU), and normalises the losses by the number of target masks (and the CE class
weights) averaged over all workers, so W workers x batch b step exactly as 1 worker x batch W b.
AdamW with the reference parameter groups, warmup + poly schedule and full-model gradient
clipping (`model.optim`); autocast (bfloat16, else float16 with a grad scaler) on GPU only.

Checkpoint folder (`<storage>/<name>/checkpoint_<step:08d>/`)::

    model/                 a model bundle (config.json + model.safetensors)
    train_state.pt         optimizer, scheduler, grad scaler, step
    train_state.json       step, run name, reported metrics so far
    rng_rank<r>.pt         torch / numpy / python RNG states of worker r

Rank 0 prints a progress line (step/total, losses, lr, images/s, PQ, ETA) at most every
PROGRESS_EVERY_S seconds and at every report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import posixpath
import random
import tempfile
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from model.bundle import load_bundle, load_state_dict_into, save_bundle
from model.config import PRESETS, Category, Mask2FormerConfig, get_config
from model.cpu_training import ChannelsLastAdamW, accelerate_cpu_training, select_uncertain_points
from model.criterion import LossConfig, build_criterion
from model.mask2former import build_model
from model.optim import build_optimizer, clip_grad_norm, warmup_poly_scheduler
from model.point_sampling import seeded_generators
from model.storage import get_filesystem, join, redact
from pipeline.params import FinetuneParams
from pipeline.train.data import to_model_inputs
from pipeline.train.evaluation import evaluate_pq, test_size_for_crop

log = logging.getLogger(__name__)

REPORT_EVERY = 10  # steps between metric reports (every worker reports at the same steps)
PROGRESS_EVERY_S = 10.0  # seconds between progress lines (plus first, last, checkpoints, evals)
CHECKPOINT_PREFIX = "checkpoint_"
STATE_JSON = "train_state.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig(FinetuneParams):
    """What every worker needs: the job's parameters (name, model, steps, lr, ...) and what
    `run_finetune` resolved from them; passed through Ray."""

    categories: tuple[Category, ...]  # the label space, in class-index order
    reinit_class_head: bool
    data_start_step: int  # the first step the dataset's stream covers
    deterministic_data: bool
    threads: int
    loss: LossConfig  # num_points already applied
    run_uri: str  # <storage>/<name>


# ----------------------------------------------------------------------------------- model

def initial_model(*, source: str, categories: tuple[Category, ...], reinit_class_head: bool,
                  crop_size: int, name: str, seed: int) -> torch.nn.Module:
    """The model to start from: a preset (random init, seeded) or a bundle, on `categories`,
    with a test size matching the training crop."""
    torch.manual_seed(seed)
    if source in PRESETS:
        cfg = dataclasses.replace(get_config(source), categories=categories)
        return build_model(_with_test_size(cfg, crop_size, name))
    base = load_bundle(source)
    cfg = _with_test_size(dataclasses.replace(base.config, categories=categories), crop_size, name)
    net = build_model(cfg)
    load_state_dict_into(net, base.state_dict(), reinit_class_head=reinit_class_head)
    return net


def _with_test_size(cfg: Mask2FormerConfig, crop_size: int, name: str) -> Mask2FormerConfig:
    min_size, max_size = test_size_for_crop(crop_size)
    inference = dataclasses.replace(cfg.inference, min_size=min_size, max_size=max_size)
    return dataclasses.replace(cfg, name=name, inference=inference)


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if hasattr(net, "module") else net


# ------------------------------------------------------------------------------ checkpoints

def save_checkpoint(directory: str, *, net, optimizer, scheduler, scaler, step: int, name: str,
                    history: list[dict], rank: int, world: int = 1) -> None:
    """Write this worker's part of a checkpoint into `directory` (rank 0: model and state).

    The .pt files hold tensors and plain values only, so they load with weights_only=True.
    Rank 0's STATE_JSON lists the size of every file rank 0 wrote and the number of workers,
    so a reader can tell a whole checkpoint from one cut short (:func:`checkpoint_complete`).
    """
    torch.save(_rng_state(), os.path.join(directory, f"rng_rank{rank}.pt"))
    if rank == 0:
        save_bundle(_unwrap(net), os.path.join(directory, "model"), name=name)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "step": step},
                   os.path.join(directory, "train_state.pt"))
        files = {}
        for folder, _, names in os.walk(directory):
            for n in names:
                full = os.path.join(folder, n)
                files[os.path.relpath(full, directory).replace(os.sep, "/")] = \
                    os.path.getsize(full)
        with open(os.path.join(directory, STATE_JSON), "w") as f:
            json.dump({"step": step, "name": name, "history": history, "world": world,
                       "files": files}, f)


def checkpoint_complete(fs, folder: str) -> int | None:
    """The step of the checkpoint in `folder` (on fsspec filesystem `fs`) when every file of
    it is there at its full size, else None (a copy or upload cut short by a failure)."""
    try:
        with fs.open(f"{folder}/{STATE_JSON}", "rb") as f:
            state = json.loads(f.read())
        for rel, size in state.get("files", {}).items():
            if fs.size(f"{folder}/{rel}") != size:
                return None
        for r in range(1, int(state.get("world", 1))):
            if not fs.exists(f"{folder}/rng_rank{r}.pt"):
                return None
        return int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest_checkpoint(run_uri: str) -> tuple[int, str] | None:
    """(step, URI) of the newest complete checkpoint of the run at `run_uri`, or None.

    Read from storage itself, not from Ray Train's run snapshot: a checkpoint is written before
    Ray records it, so a failure in between leaves the newest one on storage only.
    """
    fs, path = get_filesystem(run_uri)
    try:
        folders = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    steps = []
    for folder in folders:
        name = posixpath.basename(folder.rstrip("/"))
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
            steps.append((int(name[len(CHECKPOINT_PREFIX):]), folder.rstrip("/"), name))
    for _, folder, name in sorted(steps, reverse=True):
        step = checkpoint_complete(fs, folder)
        if step is not None:
            return step, join(run_uri, name)
    return None


def load_checkpoint(directory: str, *, net, optimizer, scheduler, scaler,
                    rank: int) -> tuple[int, list[dict]]:
    """Restore model, optimizer, scheduler, scaler and this worker's RNG; returns (step,
    history). Raises ValueError for a state file that holds more than tensors and plain values
    (unpickling it could run code)."""
    bundle = load_bundle(os.path.join(directory, "model"))
    _unwrap(net).load_state_dict(bundle.state_dict())
    state = _load_plain(os.path.join(directory, "train_state.pt"))
    optimizer.load_state_dict(state["optimizer"])
    # Keep this run's schedule (its total steps): a re-run may extend `steps`.
    scheduler.load_state_dict({**state["scheduler"],
                               "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    scaler.load_state_dict(state["scaler"])
    rng_file = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        _set_rng_state(_load_plain(rng_file))
    with open(os.path.join(directory, STATE_JSON)) as f:
        history = json.load(f).get("history", [])
    return int(state["step"]), history


def _load_plain(path: str) -> dict:
    """torch.load with weights_only=True: tensors and plain containers, never code.

    A checkpoint lives in shared storage, so whoever can write there must not be able to run
    code in the training job; a file that needs more (an older panoray's RNG file held numpy
    arrays, or a planted pickle) is refused, not loaded.
    """
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        words = str(e).split()  # torch names the refused global: "... GLOBAL posix.system ..."
        needs = words[words.index("GLOBAL") + 1] if "GLOBAL" in words[:-1] else "Python objects"
        raise ValueError(
            f"checkpoint file {os.path.basename(path)} needs {needs} to load, which could run "
            "code, so panoray refuses it (it was written by an older panoray or not by panoray "
            "at all); start a fresh run name instead of resuming this run"
        ) from None


def _rng_state() -> dict:
    """This process's torch / numpy / python RNG states as tensors and plain values."""
    numpy_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "numpy": {"bit_generator": numpy_state["bit_generator"],
                      "key": numpy_state["state"]["key"].tolist(),
                      "pos": int(numpy_state["state"]["pos"]),
                      "has_gauss": int(numpy_state["has_gauss"]),
                      "gauss": float(numpy_state["gauss"])},
            "python": random.getstate()}  # (version, tuple of ints, float or None)


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    numpy_state = rng["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": np.asarray(numpy_state["key"], dtype=np.uint32),
                                   "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -------------------------------------------------------------------------------- the loop

def _batches(shard, *, batch_size: int, rank: int, world: int, deterministic: bool):
    """This worker's batches: its streaming-split share, or (deterministic) items r::W of
    every global batch of W * batch_size consecutive stream positions."""
    if not deterministic:
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                      drop_last=True, prefetch_batches=2)
        return
    for batch in shard.iter_batches(batch_size=batch_size * world, batch_format="numpy",
                                    drop_last=True, prefetch_batches=2):
        yield {k: v[rank::world] for k, v in batch.items()}


def _all_reduce_sum(values: list[float], device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world_size() > 1:
        dist.all_reduce(t)
    return t.cpu()


def _autocast(device: torch.device):
    if device.type != "cuda":
        return nullcontext(), False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype == torch.float16


def train_step(*, net: torch.nn.Module, criterion, optimizer, scheduler, scaler, batch,
               device: torch.device, clip_grad: float,
               autocast=None) -> tuple[torch.Tensor, dict, int] | None:
    """One optimiser step on this worker's `batch` (rows of `pipeline.train.data`, or None when
    its data ran out); returns (total loss, unweighted loss terms, images) or None when any
    worker had no batch (nothing is updated then).

    The loss normalisers (target masks, CE class weights) are averaged over all workers, so
    with DDP's gradient average W workers step as one worker with their batches together.
    """
    world = _world_size()
    if batch is not None:
        images, targets = to_model_inputs(batch, device=device)
        num_queries = _unwrap(net).config.transformer_decoder.num_queries
        num_masks, weight_sum = criterion.local_normalizers(targets, num_queries=num_queries)
    else:
        num_masks = weight_sum = 0.0
    sums = _all_reduce_sum([float(num_masks), float(weight_sum), float(batch is not None)],
                           device)
    if sums[2] < world:
        return None
    generators = seeded_generators(seeds=[int(s) for s in batch["sample_seed"]])
    with autocast or nullcontext():
        outputs = net(images)
    losses = criterion(outputs, targets, num_masks=sums[0] / world,
                       class_weight_sum=sums[1] / world, generators=generators)
    total = criterion.total_loss(losses)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    clip_grad_norm(net.parameters(), max_norm=clip_grad)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return total.detach(), {k: v.detach() for k, v in losses.items()}, len(images)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def train_loop_per_worker(config: dict[str, LoopConfig]) -> None:
    """The Ray Train worker function (config: {"loop": LoopConfig}): restore, train to
    `steps`, checkpoint, evaluate."""
    import ray.train
    import ray.train.torch

    cfg = config["loop"]

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    net = initial_model(source=cfg.model, categories=cfg.categories,
                        reinit_class_head=cfg.reinit_class_head, crop_size=cfg.crop_size,
                        name=cfg.name, seed=cfg.seed)
    torch.manual_seed(cfg.seed + rank)
    net.train()
    net = ray.train.torch.prepare_model(net)
    device = next(net.parameters()).device
    on_cpu = device.type == "cpu"
    if on_cpu:  # the opt-in CPU training layer (model/cpu_training.py); same state_dict keys
        accelerate_cpu_training(net)
    optimizer = build_optimizer(net, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                backbone_lr_multiplier=cfg.backbone_lr_multiplier,
                                adamw=ChannelsLastAdamW if on_cpu else torch.optim.AdamW)
    scheduler = warmup_poly_scheduler(optimizer, total_steps=cfg.steps,
                                      warmup_steps=cfg.warmup_steps)
    autocast, fp16 = _autocast(device)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    step, history = 0, []
    with _newest_checkpoint_dir(cfg.run_uri, ray.train.get_checkpoint()) as d:
        if d is not None:
            step, history = load_checkpoint(d, net=net, optimizer=optimizer,
                                            scheduler=scheduler, scaler=scaler, rank=rank)
    if rank == 0:
        verb = "resuming at" if step else "starting at"
        log.info(f"[{cfg.name}] {verb} step {step}/{cfg.steps}, {world} worker(s) x batch "
                 f"{cfg.batch_size}, device {device}")
    criterion = build_criterion(cfg.loss, num_classes=len(cfg.categories),
                                point_selector=select_uncertain_points if on_cpu else None,
                                ).to(device)
    batches = _batches(ray.train.get_dataset_shard("train"), batch_size=cfg.batch_size,
                       rank=rank, world=world, deterministic=cfg.deterministic_data)
    skip = step - cfg.data_start_step
    if skip < 0:
        log.warning("restored step %d is before the data stream's start %d; steps %d..%d see "
                    "later data", step, cfg.data_start_step, step, cfg.data_start_step)
    for _ in range(max(skip, 0)):  # a worker-group restart inside one run replays the stream
        next(batches, None)

    meter = _Meter()
    start_time, last_print = time.monotonic(), 0.0
    start_step = step
    while step < cfg.steps:
        done = train_step(net=net, criterion=criterion, optimizer=optimizer,
                          scheduler=scheduler, scaler=scaler, batch=next(batches, None),
                          device=device, clip_grad=cfg.clip_grad, autocast=autocast)
        if done is None:  # some worker ran out of data: all stop together
            if rank == 0:
                log.warning(f"[{cfg.name}] the data stream ended at step {step}; stopping")
            break
        total, losses, num_images = done
        step += 1
        meter.add(total, losses, num_images)

        is_last = step == cfg.steps
        do_ckpt = step % cfg.checkpoint_every == 0 or is_last
        do_eval = bool(cfg.val) and ((cfg.eval_every and step % cfg.eval_every == 0) or is_last)
        if not (do_ckpt or do_eval or step % REPORT_EVERY == 0):
            now = time.monotonic()
            if rank == 0 and now - last_print >= PROGRESS_EVERY_S:
                last_print = now
                _print_progress(cfg, step, meter.local(), start_time, start_step, world)
            continue
        metrics = meter.reduce(device)
        metrics.update(step=step, elapsed_s=time.monotonic() - start_time,
                       lr=max(g["lr"] for g in optimizer.param_groups),
                       images_per_s=metrics.pop("images") * world / max(meter.seconds(), 1e-9))
        meter = _Meter()
        if do_eval and rank == 0:
            pq = evaluate_pq(_unwrap(net), cfg.val, device=device)
            net.train()
            metrics.update(pq=pq["All"]["pq"], pq_things=pq["Things"]["pq"],
                           pq_stuff=pq["Stuff"]["pq"])
        if rank == 0:
            history.append(metrics)
            last_print = time.monotonic()
            _print_progress(cfg, step, metrics, start_time, start_step, world)
        _report(cfg, metrics, history, do_ckpt=do_ckpt, net=net, optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, step=step, rank=rank, world=world)

    if rank == 0:
        save_bundle(_unwrap(net), join(cfg.run_uri, "final"), name=cfg.name,
                    storage_dtype=getattr(torch, cfg.bundle_dtype))
        _write_history(cfg.run_uri, history)
        log.info(f"[{cfg.name}] done at step {step}; final bundle at "
                 f"{redact(join(cfg.run_uri, 'final'))}")


@contextmanager
def _newest_checkpoint_dir(run_uri: str, ray_checkpoint):
    """A local folder holding the newest complete checkpoint of the run (None: start afresh):
    the one on storage when it is newer than the one Ray Train restores."""
    found = newest_checkpoint(run_uri)
    ray_step = -1
    if ray_checkpoint is not None:
        name = posixpath.basename(ray_checkpoint.path.rstrip("/"))
        digits = name[len(CHECKPOINT_PREFIX):]
        ray_step = int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else 0
    if found is None or found[0] <= ray_step:
        if ray_checkpoint is None:
            yield None
        else:
            with ray_checkpoint.as_directory() as d:
                yield d
        return
    log.info("resuming from %s: newer than the checkpoint in Ray Train's snapshot (step %d)",
             redact(found[1]), ray_step)
    fs, path = get_filesystem(found[1])
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield path
        return
    with tempfile.TemporaryDirectory() as d:
        fs.get(path.rstrip("/") + "/", d + "/", recursive=True)
        yield d


def _report(cfg: LoopConfig, metrics: dict, history: list[dict], *, do_ckpt: bool, step: int,
            rank: int, world: int, **state) -> None:
    import ray.train

    if not do_ckpt:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, step=step, name=cfg.name, history=history, rank=rank, world=world,
                        **state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:08d}")
    if rank == 0:
        _write_history(cfg.run_uri, history)


def _write_history(run_uri: str, history: list[dict]) -> None:
    fs, path = get_filesystem(join(run_uri, "history.json"))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(history, indent=1).encode())


def _print_progress(cfg: LoopConfig, step: int, m: dict, start_time: float, start_step: int,
                    world: int) -> None:
    elapsed = time.monotonic() - start_time
    done = step - start_step
    eta = elapsed / done * (cfg.steps - step) if done else float("nan")
    parts = [f"[{cfg.name}] step {step}/{cfg.steps}", f"loss {m['loss']:.3f} (ce {m['loss_ce']:.3f}"
             f" mask {m['loss_mask']:.3f} dice {m['loss_dice']:.3f})"]
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    if "images_per_s" in m:
        parts.append(f"{m['images_per_s']:.1f} img/s")
    if "pq" in m:
        parts.append(f"PQ {100 * m['pq']:.1f}")
    parts.append(f"ETA {_hms(eta)}")
    log.info(" | ".join(parts))


def _hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Meter:
    """Running sums of the losses of the steps since the last report."""

    NAMES = ("loss", "loss_ce", "loss_mask", "loss_dice")

    def __init__(self) -> None:
        self.sums = np.zeros(len(self.NAMES))
        self.count = 0
        self.images = 0
        self.start = time.monotonic()

    def add(self, total: torch.Tensor, losses: dict, images: int) -> None:
        values = [total] + [losses[n] for n in self.NAMES[1:]]
        self.sums += np.array([float(v.detach()) for v in values])
        self.count += 1
        self.images += images

    def local(self) -> dict[str, float]:
        return dict(zip(self.NAMES, (self.sums / max(self.count, 1)).tolist()))

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means over the steps since the last report and over all workers; images: local."""
        total = _all_reduce_sum([*self.sums.tolist(), float(self.count)], device)
        means = (total[:-1] / max(float(total[-1]), 1.0)).tolist()
        return {**dict(zip(self.NAMES, means)), "images": self.images}
