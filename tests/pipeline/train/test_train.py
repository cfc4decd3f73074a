"""Fine-tuning on Ray Train: S3 checkpoints, DDP equivalence, kill + resume, real COCO steps."""

from __future__ import annotations

import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import load_bundle
from model.config import get_config
from model.criterion import LossConfig, build_criterion
from model.optim import build_optimizer, warmup_poly_scheduler
from model.storage import get_filesystem
from pipeline.coco.synth import make_synthetic_dataset
from pipeline.train.data import LSJConfig, example_at, load_split
from pipeline.train.job import latest_step, run_finetune
from pipeline.train.loop import initial_model, load_checkpoint, save_checkpoint, train_step

REPO = Path(__file__).resolve().parents[3]
SMALL = dict(model="tiny", crop_size=64, lr=1e-3, warmup_steps=1, seed=0,
             loss=LossConfig(num_points=256))


@pytest.fixture
def ray_s3(s3_server, ray_local):
    """The shared local Ray, restarted if its workers predate the S3 server's environment."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL_S3")

    if ray.get(endpoint.remote()) != s3_server:
        ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _node_ip_address="127.0.0.1")
    return ray


@pytest.fixture
def one_thread():
    """Train in this process on one thread: two threads on two busy cores stall each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth_local(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(str(root), num_train=6, num_val=2, image_size=(64, 64), seed=1)
    return str(root)


def _params(uri: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_bundle(uri).state_dict().items()}


def _single_process_run(train: str, *, steps: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The same training as `run_finetune(**SMALL, deterministic_data=True)` with one worker,
    in this process without Ray: the stream's first steps * batch_size examples in order."""
    split = load_split(train)
    net = initial_model(source="tiny", categories=split.categories, reinit_class_head=True,
                        crop_size=SMALL["crop_size"], name="one", seed=SMALL["seed"]).train()
    criterion = build_criterion(SMALL["loss"], num_classes=len(split.categories))
    optimizer = build_optimizer(net, lr=SMALL["lr"])
    scheduler = warmup_poly_scheduler(optimizer, total_steps=steps,
                                      warmup_steps=SMALL["warmup_steps"])
    lsj = LSJConfig(crop_size=SMALL["crop_size"])
    for step in range(steps):
        rows = [example_at(split, step * batch_size + i, lsj=lsj, seed=SMALL["seed"])
                for i in range(batch_size)]
        train_step(net=net, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                   scaler=torch.amp.GradScaler("cpu", enabled=False), batch=_batch(rows),
                   device=torch.device("cpu"), clip_grad=0.01)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.slow
def test_two_workers_on_s3_step_like_one_process_with_the_whole_batch(ray_s3, s3_bucket,
                                                                     one_thread):
    data = f"s3://{s3_bucket}/synth"
    make_synthetic_dataset(data, num_train=6, num_val=2, image_size=(64, 64), seed=1)
    two = run_finetune(train=f"{data}/train", val=f"{data}/val", storage=f"s3://{s3_bucket}/runs",
                       name="ddp2", num_workers=2, batch_size=1, steps=3, checkpoint_every=2,
                       deterministic_data=True, **SMALL)

    # Checkpoints, metrics and the final bundle landed on S3.
    fs, _ = get_filesystem(f"s3://{s3_bucket}")
    run_dir = f"{s3_bucket}/runs/ddp2"
    checkpoints = sorted(n for n in (p.rsplit("/", 1)[-1] for p in fs.ls(run_dir))
                         if re.fullmatch(r"checkpoint_\d{8}", n))
    assert checkpoints == ["checkpoint_00000002", "checkpoint_00000003"]
    files = {p.rsplit("/", 1)[-1] for p in fs.find(f"{run_dir}/checkpoint_00000003")}
    assert {"config.json", "model.safetensors", "train_state.pt", "train_state.json",
            "rng_rank0.pt", "rng_rank1.pt"} <= files
    assert two["step"] == 3 and two["start_step"] == 0
    last = two["history"][-1]
    assert all(math.isfinite(last[k]) for k in ("loss", "loss_ce", "loss_mask", "loss_dice"))
    assert 0.0 <= last["pq"] <= 1.0 and last["images_per_s"] > 0 and last["lr"] >= 0
    assert two["final_bundle"] == f"s3://{s3_bucket}/runs/ddp2/final"

    # DDP: 2 workers x batch 1 == 1 process x batch 2, up to float reordering (which Adam's
    # normalisation amplifies for near-zero gradients: observed ~0.1% of the distance moved
    # and < lr / 20 per element; normalising by per-worker mask counts gives ~4% and ~lr).
    init = initial_model(source="tiny", categories=load_split(f"{data}/train").categories,
                         reinit_class_head=True, crop_size=64, name="x", seed=0).state_dict()
    a = _params(two["final_bundle"])
    b = _single_process_run(f"{data}/train", steps=3, batch_size=2)
    moved = sum(((a[k] - init[k]) ** 2).sum() for k in a).sqrt().item()
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt().item()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 0.1
    assert apart < 0.01 * moved, f"2-worker and 1-worker parameters differ by {apart / moved:.2%}"
    assert worst < 0.25 * SMALL["lr"], f"an element differs by {worst}"


KILLABLE_RUN = textwrap.dedent("""
    import sys, ray
    from model.criterion import LossConfig
    from pipeline.train.job import run_finetune
    ray.init(address=sys.argv[3])
    run_finetune(train=sys.argv[1], storage=sys.argv[2], name="killed", steps=6,
                 batch_size=1, num_workers=1, model="tiny", crop_size=64, lr=1e-3,
                 warmup_steps=1, checkpoint_every=2, seed=0, loss=LossConfig(num_points=256))

""")


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(ray_local, synth_local, tmp_path,
                                                       monkeypatch):
    storage = str(tmp_path / "runs")
    run_uri = f"{storage}/killed"
    address = ray_local.get_runtime_context().gcs_address
    log_file = open(tmp_path / "run.log", "w")
    # A driver on the shared cluster, as a job on a real cluster: killing it takes its trainer
    # (controller and workers, owned by the driver) down with it; the cluster stays.
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_RUN, f"{synth_local}/train", storage, address],
        cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while latest_step(run_uri) == 0:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies without any cleanup
        proc.wait()
        log_file.close()
    killed_at = latest_step(run_uri)
    assert 2 <= killed_at < 6

    # The resume as a user types it, with relative paths: Ray Train's workers run in another
    # working directory, so the job must make them absolute (val is read there at the end).
    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(synth_local, tmp_path)
    # And inside the resumed run, its worker process is SIGKILLed once a newer checkpoint is
    # in: Ray Train restarts the worker group from the newest checkpoint and the steps go on.
    worker_killed = threading.Event()

    def kill_the_worker_after_a_new_checkpoint() -> None:
        import psutil

        deadline = time.monotonic() + 300
        while latest_step(run_uri) <= killed_at and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in psutil.process_iter(["cmdline"]):
            if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or ()):
                p.kill()
                worker_killed.set()

    threading.Thread(target=kill_the_worker_after_a_new_checkpoint, daemon=True).start()
    result = run_finetune(train=f"{data}/train", val=f"{data}/val", storage="runs",
                          name="killed", steps=8, batch_size=1, num_workers=1,
                          checkpoint_every=2, max_failures=1, **SMALL)
    assert worker_killed.is_set(), "the worker was never killed"
    assert result["final_bundle"] == f"{storage}/killed/final"
    assert "pq" in result["metrics"]
    assert result["start_step"] == killed_at
    assert result["step"] == 8
    steps = [h["step"] for h in result["history"]]
    # no step is repeated beyond the last checkpoint: each step's report is in history once
    assert steps == sorted(set(steps)) and steps[-1] == 8 and killed_at in steps
    assert latest_step(run_uri) == 8
    assert load_bundle(result["final_bundle"]).config.num_classes == 8


def test_a_few_steps_on_real_coco_images_lower_the_loss(coco_sample, one_thread):
    split = load_split(str(coco_sample / "panoptic_examples.json"))
    net = initial_model(source="tiny", categories=split.categories, reinit_class_head=True,
                        crop_size=128, name="coco", seed=0).train()
    assert net.config.num_classes == 133
    criterion = build_criterion(LossConfig(num_points=1024), num_classes=133)
    optimizer = build_optimizer(net, lr=1e-3)
    scheduler = warmup_poly_scheduler(optimizer, total_steps=100, warmup_steps=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rows = [example_at(split, p, lsj=LSJConfig(crop_size=128, min_scale=0.5, max_scale=1.0),
                       seed=0) for p in range(2)]
    batch = _batch(rows)
    totals = []
    for _ in range(6):
        total, losses, images = train_step(
            net=net, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
            scaler=scaler, batch=batch, device=torch.device("cpu"), clip_grad=0.01)
        assert images == 2 and all(torch.isfinite(v) for v in losses.values())
        totals.append(float(total))
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.9 * totals[0], totals


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows of the example stream as one batch, as Ray Data hands them to a worker."""
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0] if k != "labels"}
    batch["labels"] = np.empty(len(rows), dtype=object)
    batch["labels"][:] = [r["labels"] for r in rows]
    return batch


def test_run_finetune_takes_every_finetune_spec_field():
    import dataclasses
    import inspect

    from jobs.spec import FinetuneSpec

    params = inspect.signature(run_finetune).parameters
    assert {f.name for f in dataclasses.fields(FinetuneSpec)} <= set(params)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def test_bad_settings_fail_before_any_work(tmp_path, synth_local):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        run_finetune(train=f"{synth_local}/train", storage=str(tmp_path), steps=0)
    with pytest.raises(FileNotFoundError, match="one COCO panoptic JSON"):
        run_finetune(train=str(tmp_path), storage=str(tmp_path), steps=1)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        run_finetune(train=f"{synth_local}/train", storage=str(tmp_path), steps=1,
                     model=str(tmp_path / "nothing"))


def _training_state(seed: int = 0) -> dict:
    """A tiny model with optimizer, scheduler and scaler after one step (Adam moments set)."""
    torch.manual_seed(seed)
    net = initial_model(source="tiny", categories=get_config("tiny").categories,
                        reinit_class_head=True, crop_size=64, name="ckpt", seed=seed)
    optimizer = build_optimizer(net, lr=1e-3)
    scheduler = warmup_poly_scheduler(optimizer, total_steps=10, warmup_steps=1)
    sum(p.square().sum() for p in net.parameters()).backward()
    optimizer.step()
    scheduler.step()
    return dict(net=net, optimizer=optimizer, scheduler=scheduler,
                scaler=torch.amp.GradScaler("cpu", enabled=False))


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_checkpoint_round_trips_with_plain_tensors_and_values(tmp_path):
    state = _training_state()
    save_checkpoint(str(tmp_path), step=7, name="ckpt", history=[{"step": 7}], rank=0, **state)
    expected = _draws()  # what a resumed worker draws next
    for name in ("train_state.pt", "rng_rank0.pt"):  # nothing in them needs code to load
        torch.load(tmp_path / name, weights_only=True)
    fresh = _training_state(seed=1)
    step, history = load_checkpoint(str(tmp_path), rank=0, **fresh)
    assert (step, history) == (7, [{"step": 7}])
    assert _draws() == expected
    saved, loaded = state["optimizer"].state_dict(), fresh["optimizer"].state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for k, v in saved["state"].items():
        assert all(torch.equal(v[key], loaded["state"][k][key]) for key in v)
    assert fresh["scheduler"].last_epoch == state["scheduler"].last_epoch == 1


class _Planted:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    """A genuine checkpoint folder; tests copy it before planting anything."""
    ckpt = tmp_path_factory.mktemp("saved") / "checkpoint_00000002"
    ckpt.mkdir()
    save_checkpoint(str(ckpt), step=2, name="ckpt", history=[], rank=0, **_training_state())
    return ckpt


def test_resume_takes_the_newest_whole_checkpoint_on_storage(tmp_path):
    """Ray Train records a checkpoint in its run snapshot only after it is written: a run
    killed in between has a newer checkpoint on storage than in the snapshot. Resume from the
    newest one that is whole, not from the snapshot's, and never from one cut short."""
    from pipeline.train.loop import _newest_checkpoint_dir, newest_checkpoint

    state = _training_state()
    run = tmp_path / "run"
    for step in (5, 10, 15, 20):
        ckpt = run / f"checkpoint_{step:08d}"
        ckpt.mkdir(parents=True)
        for rank in (0, 1):  # two workers: each writes its part
            save_checkpoint(str(ckpt), step=step, name="r", history=[{"step": step}],
                            rank=rank, world=2, **state)
    weights = run / "checkpoint_00000020" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an upload cut short
    (run / "checkpoint_00000015" / "rng_rank1.pt").unlink()  # a worker's part never landed
    assert newest_checkpoint(str(run)) == (10, f"{run}/checkpoint_00000010")
    assert latest_step(str(run)) == 10

    class InSnapshot:  # what ray.train.get_checkpoint() hands a worker: the snapshot's newest
        path = str(run / "checkpoint_00000005")

    with _newest_checkpoint_dir(str(run), InSnapshot()) as d:
        step, history = load_checkpoint(d, rank=1, **_training_state(seed=1))
    assert (step, history) == (10, [{"step": 10}])
    assert newest_checkpoint(str(tmp_path / "no-such-run")) is None


@pytest.mark.parametrize("victim", ["train_state.pt", "rng_rank0.pt"])
def test_resume_refuses_a_planted_pickle_without_running_it(tmp_path, saved_checkpoint, victim):
    ckpt = Path(shutil.copytree(saved_checkpoint, tmp_path / saved_checkpoint.name))
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": _Planted(marker)}, ckpt / victim)
    with pytest.raises(ValueError, match=rf"^checkpoint file {victim} needs \w+\.system to "
                       r"load, which could run code, .* start a fresh run name"):
        load_checkpoint(str(ckpt), rank=0, **_training_state())
    assert not marker.exists(), "resuming ran the checkpoint's code"
    torch.load(ckpt / victim, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()


def test_resume_refuses_an_older_rng_file_with_numpy_arrays(tmp_path, saved_checkpoint):
    ckpt = Path(shutil.copytree(saved_checkpoint, tmp_path / saved_checkpoint.name))
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()}, ckpt / "rng_rank0.pt")  # the format before
    with pytest.raises(ValueError, match="rng_rank0.pt needs .* start a fresh run name"):
        load_checkpoint(str(ckpt), rank=0, **_training_state())
