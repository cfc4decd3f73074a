"""Fine-tuning on Ray Train: `run_finetune` builds and runs the TorchTrainer.

    result = run_finetune(train="s3://data/coco/train", val="s3://data/coco/val",
                          storage="s3://runs", name="coco-tiny", model="tiny", steps=1000,
                          num_workers=2)
    result["final_bundle"]       # "s3://runs/coco-tiny/final", a model bundle

The per-worker loop lives in `pipeline.train.loop`, the example stream in
`pipeline.train.data`. Storage (local folder or s3://), one folder per run name::

    <storage>/<name>/checkpoint_<step:08d>/   every `checkpoint_every` steps and at the end
    <storage>/<name>/final/                   the final model bundle
    <storage>/<name>/history.json             reported metrics (losses, lr, images/s, PQ)
    <storage>/<name>/...                      Ray Train's own run files

Running again with the same name and storage resumes from the newest complete checkpoint on
storage (`pipeline.train.loop.newest_checkpoint`; not only Ray Train V2's run snapshot, which
records a checkpoint after it is written, so a failure in between would lose it), and this driver
starts the data stream where that checkpoint left it: the step count continues. A worker-group
restart inside one run (`max_failures`) resumes the same way.

Label space: the train JSON's categories sorted by category id. A starting bundle with the same
categories keeps its own order and class head; one with other categories keeps everything but
the class head, which is re-initialised for the new label space.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from model.config import PRESETS, Category, Mask2FormerConfig
from model.criterion import LossConfig
from model.storage import (
    absolute,
    get_filesystem,
    is_remote,
    join,
    pyarrow_filesystem,
    redact,
)
from pipeline.params import FinetuneParams, as_kwargs, with_params
from pipeline.train.data import LSJConfig, load_split, train_dataset
from pipeline.train.loop import LoopConfig, newest_checkpoint, train_loop_per_worker

log = logging.getLogger(__name__)


@with_params(FinetuneParams)
def run_finetune(p: FinetuneParams, *, cpus_per_worker: float | None = None,
                 deterministic_data: bool = False,
                 loss: LossConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune `model` (a preset name, random init, or a bundle URI) on the COCO panoptic split
    `train` with Ray Train; see the module doc for storage, resume and label space.

    Takes the fields of `pipeline.params.FinetuneParams` as keywords, or a params object
    (`run_finetune(params=p)`; keywords given beside it override its fields). The other
    arguments are not in the job spec: `cpus_per_worker` (default: 1 with GPUs; on CPU, at most
    1 and leaving one CPU of the cluster to the data tasks), `deterministic_data` (every worker
    reads the whole stream in order and keeps items r::W of each global batch: results then do
    not depend on the number of workers, at W times the decoding work; for tests and
    debugging), `loss` (criterion settings; default the reference; `num_points`, when set,
    replaces its point count), `progress` (Ray Data's progress bars of the data stream, which
    the driver redraws on stderr whatever it is: off for a log; the rank-0 step lines stay).

    Returns {"name", "run_dir", "final_bundle", "start_step", "step", "metrics" (the last
    report), "history" (every report of the run, resumed ones included)}.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    # Ray Train workers run elsewhere (another cwd, another node): local paths go absolute.
    p = dataclasses.replace(p, train=absolute(p.train), storage=absolute(p.storage),
                            val=absolute(p.val) if p.val else None,
                            model=absolute(p.model) if _is_path(p.model) else p.model)
    loss = loss or LossConfig()
    if p.num_points is not None:
        loss = dataclasses.replace(loss, num_points=p.num_points)
    lsj = LSJConfig(crop_size=p.crop_size, min_scale=p.min_scale, max_scale=p.max_scale)
    run_uri = join(p.storage, p.name)
    categories, reinit = _label_space(p.train, p.model)
    split = load_split(p.train, category_order=[c.id for c in categories])
    if not ray.is_initialized():  # no address: a Ray instance of our own, never a stray one
        ray.init(address=p.address or "local")
    storage_fs, storage_path = _ray_storage(p.storage)
    start_step = latest_step(run_uri)
    if start_step:
        print(f"[{p.name}] found a checkpoint at step {start_step} in {redact(run_uri)}: "
              "resuming", flush=True)
    if cpus_per_worker is None:
        cpus_per_worker = _default_cpus_per_worker(p.num_workers, p.use_gpu)
    global_batch = p.num_workers * p.batch_size
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = progress  # the dataset takes it along
    dataset = train_dataset(split, lsj=lsj, seed=p.seed, start=start_step * global_batch,
                            num_samples=max(p.steps - start_step, 1) * global_batch)
    loop = LoopConfig(**as_kwargs(p), categories=categories, reinit_class_head=reinit,
                      data_start_step=start_step, deterministic_data=deterministic_data,
                      threads=max(1, int(cpus_per_worker)), loss=loss, run_uri=run_uri)
    data_config = ray.train.DataConfig()
    if deterministic_data:
        from ray.data import ExecutionOptions

        data_config = ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.num_workers, use_gpu=p.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if p.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=p.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=p.num_to_keep)),
        datasets={"train": dataset},
        dataset_config=data_config,
    )
    result = trainer.fit()
    history = read_history(run_uri)
    return {
        "name": p.name,
        "run_dir": redact(run_uri),
        "final_bundle": redact(join(run_uri, "final")),
        "start_step": start_step,
        "step": history[-1]["step"] if history else start_step,
        "metrics": dict(result.metrics or {}),
        "history": history,
    }


def _default_cpus_per_worker(num_workers: int, use_gpu: bool) -> float:
    """1 CPU per GPU worker; on CPU clusters leave at least one CPU for the data tasks."""
    import ray

    if use_gpu:
        return 1.0
    total = float(ray.cluster_resources().get("CPU", 1))
    share = (total - 1) / num_workers
    if share <= 0:
        raise ValueError(f"a cluster of {total:g} CPUs cannot hold {num_workers} training "
                         "workers and the data tasks; use fewer workers or a bigger cluster")
    return min(1.0, share)


def _is_path(model: str) -> bool:
    """A local bundle folder rather than a preset name or a remote URI."""
    return not is_remote(model) and model not in PRESETS


def _ray_storage(storage: str):
    """(pyarrow filesystem or None, storage_path) for RunConfig."""
    if is_remote(storage):
        return pyarrow_filesystem(storage)
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    return None, os.path.abspath(storage)


def _label_space(train: str, source: str) -> tuple[tuple[Category, ...], bool]:
    """(categories in class-index order, whether the class head must be re-initialised)."""
    from pipeline.train.data import dataset_categories, split_layout

    json_uri, _, _ = split_layout(train)
    fs, path = get_filesystem(json_uri)
    with fs.open(path, "rb") as f:
        categories = dataset_categories(json.load(f))
    if source in PRESETS:
        return categories, True
    start = _bundle_config(source)
    if sorted(c.id for c in start.categories) == sorted(c.id for c in categories):
        by_id = {c.id: c for c in categories}
        return tuple(by_id[c.id] for c in start.categories), False
    print(f"the train data's {len(categories)} categories differ from the bundle's "
          f"{len(start.categories)}: the class head starts afresh", flush=True)
    return categories, True


def _bundle_config(uri: str) -> Mask2FormerConfig:
    from model.bundle import read_bundle_config

    try:
        return read_bundle_config(uri).config
    except FileNotFoundError:
        raise FileNotFoundError(f"model {redact(uri)!r} is neither a preset ({sorted(PRESETS)}) "
                                "nor a model bundle folder; pass one of those") from None


def latest_step(run_uri: str) -> int:
    """The step the run at `run_uri` resumes from: its newest complete checkpoint (0: none)."""
    found = newest_checkpoint(run_uri)
    return found[0] if found else 0


def read_history(run_uri: str) -> list[dict]:
    """The metrics reported so far by the run at `run_uri` (rank 0's `history.json`)."""
    fs, path = get_filesystem(join(run_uri, "history.json"))
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return json.load(f)

