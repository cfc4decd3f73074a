"""The segment job on Ray Data: image shards at SRC -> one Parquet row per image at DST.

    list shards -> skip committed -> read (tasks) -> decode (tasks) -> predict (actor pool)
                -> encode (tasks) -> driver: assemble each shard, commit it atomically

Exactly once: a shard's rows land in one file named after the shard, written in one atomic
step (see :mod:`pipeline.segment.commits`), so kills and re-runs never duplicate or lose an
input, and a later run over the same SRC does only the shards it has not done. One job at a time
per DST (a heartbeat lock). The Ray calls of the job live in this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import ray
from ray.data import ActorPoolStrategy, DataContext

from model.bundle import read_bundle_config
from model.storage import redact
from pipeline.params import SegmentParams, with_params
from pipeline.segment.commits import OutputStore, WriterLock, shard_key
from pipeline.segment.predictor import PanopticPredictor
from pipeline.segment.rows import ShardAssembler, decode_stage, encode_stage, read_shard
from pipeline.segment.sources import list_shards

log = logging.getLogger(__name__)


@dataclass
class SegmentSummary:
    src: str
    dst: str
    shards_total: int = 0
    shards_skipped: int = 0  # already committed by an earlier run
    shards_done: int = 0
    images_ok: int = 0
    images_failed: int = 0
    seconds: float = 0.0
    failed_examples: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return (self.images_ok + self.images_failed) / self.seconds if self.seconds else 0.0

    def render(self) -> str:
        lines = [
            f"segment: {self.shards_done} new shards done, {self.shards_skipped} already done, "
            f"{self.shards_total} in {redact(self.src)}",
            f"images: {self.images_ok} ok, {self.images_failed} failed, "
            f"{self.images_per_s:.2f} images/s over {self.seconds:.1f} s",
            f"output: {redact(self.dst)}/data/*.parquet",
        ]
        lines += [f"  failed: {e}" for e in self.failed_examples]
        return "\n".join(lines)


IO_NICE = 10  # priority drop of read / decode / encode tasks beside CPU-only predictors


@dataclass
class Resources:
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads_per_actor: int


def plan_resources(*, num_actors: int | None, gpus_per_actor: float | None,
                   cpus_per_actor: float, threads_per_actor: int | None) -> Resources:
    """Size the predictor pool from the cluster: one actor per GPU, else leave CPU for I/O.

    On a CPU-only cluster the pool never takes every CPU: reading, decoding, encoding and
    writing run as tasks and need at least one CPU of their own (a full pool deadlocks).
    """
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1)), float(total.get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        fit = int(gpus // gpus_per_actor)
        free_cpu = cpus - 1
    else:
        fit = int(max(cpus - 1, 0) // cpus_per_actor)
        free_cpu = cpus - 1
    if num_actors is None:
        num_actors = max(1, fit)
    if gpus_per_actor == 0 and num_actors * cpus_per_actor > max(free_cpu, cpus_per_actor):
        raise ValueError(
            f"{num_actors} predictor actors x {cpus_per_actor} CPUs would take every CPU of the "
            f"cluster ({cpus:g}); reading and decoding need one too: use at most "
            f"{max(1, fit)} actors")
    if threads_per_actor is None:
        threads_per_actor = max(1, (os.cpu_count() or 1) // num_actors) if gpus_per_actor == 0 \
            else 4
    return Resources(num_actors, gpus_per_actor, cpus_per_actor, threads_per_actor)


@with_params(SegmentParams)
def run_segment(p: SegmentParams, *, progress: bool = True,
                predictor: type[PanopticPredictor] | None = None) -> SegmentSummary:
    """Segment every not-yet-committed shard under `src` into `dst`; see the module doc.

    Takes the fields of `pipeline.params.SegmentParams` as keywords (`run_segment(src=...,
    dst=..., model=..., batch_size=8)`), or a params object (`run_segment(params=p)`; keywords
    given beside it override its fields). `progress`: Ray Data's progress bars. `predictor`: the
    class of the predictor actors; None is PanopticPredictor, and for now another must be a
    subclass of it (built as PanopticPredictor(model, batch_size=, threads=), called on Ray
    Data batches).
    """
    predictor = predictor or PanopticPredictor
    if not (isinstance(predictor, type) and issubclass(predictor, PanopticPredictor)):
        raise TypeError(f"predictor must be PanopticPredictor or a subclass of it, got "
                        f"{predictor!r}")
    started = time.time()
    summary = SegmentSummary(src=p.src, dst=p.dst)
    with WriterLock(p.dst, stale_after_s=p.stale_lock_s,
                    heartbeat_s=min(30.0, p.stale_lock_s / 4)) as lock:
        shards = list_shards(p.src, files_per_shard=p.files_per_shard,
                             image_column=p.image_column)
        store = OutputStore(p.dst)
        done_keys = store.committed_keys()
        regrouped = RegroupedFiles(store, shards, done_keys)
        pending = [s for s in shards if shard_key(s.id) not in done_keys]
        summary.shards_total = len(shards)
        summary.shards_skipped = len(shards) - len(pending)
        if p.limit_shards is not None:
            pending = pending[:p.limit_shards]
        log.info("%d shards at %s: %d already committed, %d to do", len(shards), redact(p.src),
                 summary.shards_skipped, len(pending))
        if pending:
            bundle = read_bundle_config(p.model)  # config.json only: no weights in the driver
            config, model_id = bundle.config, bundle.model_id
            _ensure_ray(p.address)
            res = plan_resources(num_actors=p.num_actors, gpus_per_actor=p.gpus_per_actor,
                                 cpus_per_actor=p.cpus_per_actor,
                                 threads_per_actor=p.threads_per_actor)
            ds = _build_dataset(pending, model=p.model, model_id=model_id, config=config,
                                batch_size=p.batch_size, max_pixels=p.max_pixels, res=res,
                                progress=progress, predictor=predictor)
            _drain(ds, store=store, lock=lock, summary=summary, total=len(pending),
                   on_commit=regrouped.after_commit)
    summary.seconds = time.time() - started
    return summary


def _commit(store: OutputStore, shard_id: str, table, on_commit) -> None:
    store.commit_shard(shard_id, table)
    on_commit(shard_id)


class RegroupedFiles:
    """Keeps loose-file outputs free of duplicates when files are regrouped between runs.

    Adding or removing a loose file changes the member list, and so the id, of the shard it
    falls in; the old shard's file stays committed under its old id. Once a current shard is
    committed, the rows it holds are dropped from such stale files (at start-up for shards
    committed by an earlier, interrupted run; right after each commit during this one).
    """

    def __init__(self, store: OutputStore, shards, committed: set[str]):
        self.store = store
        self.members = {s.id: set(s.members) for s in shards if s.kind == "files"}
        current = {shard_key(s.id) for s in shards}
        stale = sorted(committed - current)
        self.stale = {key: store.image_ids(key) for key in stale} if self.members else {}
        for shard_id in self.members:
            if shard_key(shard_id) in committed:
                self.after_commit(shard_id)

    def after_commit(self, shard_id: str) -> None:
        members = self.members.get(shard_id)
        if not members:
            return
        for key, ids in list(self.stale.items()):
            overlap = ids & members
            if overlap:
                self.store.drop_images(key, overlap)
                ids -= overlap
                log.info("dropped %d regrouped rows from stale shard file %s", len(overlap), key)
            if not ids:
                del self.stale[key]


def _ensure_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def _build_dataset(pending, *, model, model_id, config, batch_size, max_pixels, res, progress,
                   predictor=PanopticPredictor):
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ds = ray.data.from_items([{"shard": dataclasses.asdict(s)} for s in pending],
                             override_num_blocks=max(1, len(pending)))
    # CPU-only predictors: the I/O tasks run at a lower priority than the model's threads.
    nice = IO_NICE if res.gpus_per_actor == 0 else 0
    ds = ds.flat_map(read_shard, fn_kwargs={"nice": nice})
    # Decoding gets its own CPU tasks (fractional CPUs keep it from being fused into the
    # predictor actors, where it would stall the model).
    # Small batches keep rows moving: a shard commits as soon as its last row is through.
    # Photos travel at their original size: the predictor owns the test-time resize.
    ds = ds.map_batches(decode_stage, batch_size=4, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"max_pixels": max_pixels, "nice": nice})
    ds = ds.map_batches(
        predictor,
        fn_constructor_args=(model,),
        fn_constructor_kwargs={"batch_size": batch_size, "threads": res.threads_per_actor},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=res.num_actors, max_size=res.num_actors),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
    )
    return ds.map_batches(encode_stage, batch_size=None, batch_format="numpy",
                          fn_kwargs={"model_id": model_id, "nice": nice})


def _drain(ds, *, store: OutputStore, lock: WriterLock, summary: SegmentSummary,
           total: int, on_commit) -> None:
    assembler = ShardAssembler()
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="commit") as pool:
        inflight: list[Future] = []
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pylist()
            for shard_id, table in assembler.add_rows(rows):
                lock.ensure_held()
                inflight.append(pool.submit(_commit, store, shard_id, table, on_commit))
                statuses = table.column("status").to_pylist()
                ok = sum(s == "ok" for s in statuses)
                summary.images_ok += ok
                summary.images_failed += len(statuses) - ok
                summary.shards_done += 1
                for row in table.to_pylist():
                    if row["status"] != "ok" and len(summary.failed_examples) < 10:
                        summary.failed_examples.append(f"{row['image_uri']}: {row['error']}")
                rate = (summary.images_ok + summary.images_failed) / (time.time() - t0)
                log.info("committed shard %s (%d/%d shards, %d images ok, %d failed, %.2f "
                         "images/s)", shard_id, summary.shards_done, total, summary.images_ok,
                         summary.images_failed, rate)
            # surface commit errors early
            for f in [f for f in inflight if f.done()]:
                f.result()
                inflight.remove(f)
        for f in inflight:
            f.result()
    if assembler.pending:
        raise RuntimeError(f"{assembler.pending} shards did not receive all their rows; re-run "
                           "the job: committed shards are kept and only these are redone")
