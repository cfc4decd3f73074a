"""The segment job on Ray Data: image shards at SRC -> one Parquet row per image at DST.

    list shards -> skip committed -> read + decode (tasks) -> predict, then encode + stage
      parts (actor pool: rows go straight to storage) -> driver: shard names and ordinals
      only -> one authorised commit per complete shard (committer actors: parts -> shard file)

The driver never sees a row: it deals in shard names, part names and counts, so its CPU and
memory do not grow with the number or size of images. Exactly once: a shard's rows land in
one file named after the shard, written in one atomic step by the one commit the driver
authorises once every image of the shard is in some part (see :mod:`pipeline.segment.commits`),
so kills and re-runs never duplicate or lose an input, and a later run over the same SRC does
only the shards it has not done. One job at a time per DST (a heartbeat lock). The Ray calls of
the job live in this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.data import ActorPoolStrategy, DataContext
from ray.data.block import BlockAccessor

from model.bundle import read_bundle_config
from model.storage import redact
from pipeline.params import SegmentParams, with_params
from pipeline.segment.commits import (
    Committer,
    OutputStore,
    ShardProgress,
    WriterLock,
    shard_key,
)
from pipeline.segment.rows import (
    DEFAULT_PREDICTOR,
    END,
    PredictStage,
    load_predictor,
    read_decode_stage,
)
from pipeline.segment.schema import OUTPUT_SCHEMA
from pipeline.segment.sources import Skipped, check_output_place, list_shards

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
    skipped: Skipped = field(default_factory=Skipped)  # files under SRC that get no row

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
        if self.skipped.total:
            lines.insert(2, f"inputs: {self.skipped.render()}")
        lines += [f"  failed: {e}" for e in self.failed_examples]
        return "\n".join(lines)


IO_NICE = 10  # priority drop of read / decode / encode tasks beside CPU-only predictors
READ_CPUS = 0.5  # CPU reservation of a read + decode task beside GPU predictors
ROWS_PER_CALL = 16  # photos per decode batch and per predict() call
CALLS_PER_ACTOR = 2  # blocks an actor takes at a time: it encodes one while it predicts the next


@dataclass
class Resources:
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads_per_actor: int


def plan_resources(*, num_actors: int | None, gpus_per_actor: float | None,
                   cpus_per_actor: float, threads_per_actor: int | None) -> Resources:
    """Size the predictor pool from the cluster: one actor per GPU, else one per CPU.

    On GPUs, reading and decoding run as tasks beside the actors and need CPU of their own (a
    pool that takes every CPU deadlocks): GPU actors reserve less CPU each where the cluster
    has few CPUs per GPU. On a CPU-only cluster each actor reads and decodes its own shards
    (the read stage asks for what an actor asks for, so Ray Data runs it inside the actor
    calls): the pool may take every CPU, and asking for more actors than fit is an error.
    """
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1)), float(total.get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        fit = int(gpus // gpus_per_actor)
        if fit < 1:
            raise ValueError(
                f"each predictor actor asks for {gpus_per_actor:g} GPU, but the cluster has "
                f"{gpus:g}; use --gpus-per-actor 0 to run on CPUs, or add GPU nodes")
        if num_actors is None:
            num_actors = fit
        if num_actors > fit:
            raise ValueError(
                f"{num_actors} predictor actors x {gpus_per_actor:g} GPU need "
                f"{num_actors * gpus_per_actor:g} GPUs, but the cluster has {gpus:g}; use at "
                f"most {fit} actors")
        # GPU actors must leave CPU for the read + decode tasks: on a cluster with few CPUs
        # per GPU their reservation shrinks (Ray would otherwise place every actor, no task,
        # and the job would wait forever).
        room = max(cpus - 1, cpus / 2)
        if num_actors * cpus_per_actor > room:
            cpus_per_actor = room / num_actors
            log.info("%d GPU actors on %g CPUs: each reserves %.2f CPU, to leave room for "
                     "reading and decoding", num_actors, cpus, cpus_per_actor)
    else:
        fit = max(1, int(cpus // cpus_per_actor)) if cpus_per_actor > 0 else max(1, int(cpus))
        if num_actors is None:
            num_actors = fit
        if num_actors * cpus_per_actor > max(cpus, cpus_per_actor):
            raise ValueError(
                f"{num_actors} predictor actors x {cpus_per_actor:g} CPUs need "
                f"{num_actors * cpus_per_actor:g} CPUs, but the cluster has {cpus:g}; use at "
                f"most {fit} actors")
    if threads_per_actor is None:
        threads_per_actor = max(1, (os.cpu_count() or 1) // num_actors) if gpus_per_actor == 0 \
            else 4
    return Resources(num_actors, gpus_per_actor, cpus_per_actor, threads_per_actor)


@with_params(SegmentParams)
def run_segment(p: SegmentParams, *, progress: bool = True) -> SegmentSummary:
    """Segment every not-yet-committed shard under `src` into `dst`; see the module doc.

    Takes the fields of `pipeline.params.SegmentParams` as keywords (`run_segment(src=...,
    dst=..., model=..., batch_size=8)`), or a params object (`run_segment(params=p)`; keywords
    given beside it override its fields). `progress`: Ray Data's progress bars. `predictor`: the
    class of the predictor actors, or its "package.module:Class" name (default
    PanopticPredictor, which the driver names and only the actors import, with torch): any
    class that follows the predictor contract, built once per actor as
    `predictor(model, **options)` (of batch_size and threads, those its constructor takes),
    `predict(images)` -> [(id_map, segments_info)].
    """
    predictor = p.predictor or DEFAULT_PREDICTOR
    if isinstance(predictor, str):
        if predictor != DEFAULT_PREDICTOR:  # a user's class: found here, or one sentence
            predictor = load_predictor(predictor)
    elif not (isinstance(predictor, type) and callable(getattr(predictor, "predict", None))):
        raise TypeError(f"predictor must be a class with a predict(images) method, got "
                        f"{predictor!r}")
    started = time.time()
    summary = SegmentSummary(src=p.src, dst=p.dst)
    check_output_place(p.src, p.dst)
    with WriterLock(p.dst, stale_after_s=p.stale_lock_s,
                    heartbeat_s=min(30.0, p.stale_lock_s / 4)) as lock:
        store = OutputStore(p.dst)
        store.mark()
        store.clear_staging()  # parts of killed runs (we hold the lock: nobody else writes)
        done_keys = store.committed_keys()  # one listing of DST/data; nothing is read
        # The listing of SRC streams in a thread; Ray starts as soon as one shard is known to
        # be due, while the rest of a big archive is still being listed. The job itself starts
        # from the whole listing, as before.
        listing = _Listing(p, store, done_keys, summary.skipped)
        try:
            ready = p.limit_shards != 0 and listing.wait_first_pending()
            if ready:
                _prepare_run(p, predictor)
            shards, regrouped = listing.result()
        finally:
            listing.stop()
        pending = [s for s in shards if shard_key(s.id) not in done_keys]
        summary.shards_total = len(shards)
        summary.shards_skipped = len(shards) - len(pending)
        if p.limit_shards is not None:
            pending = pending[:p.limit_shards]
        log.info("%d shards at %s: %d already committed, %d to do", len(shards), redact(p.src),
                 summary.shards_skipped, len(pending))
        if summary.skipped.total:
            log.info("inputs: %s", summary.skipped.render())
        if pending:
            if not ready:
                _prepare_run(p, predictor)
            res = plan_resources(num_actors=p.num_actors, gpus_per_actor=p.gpus_per_actor,
                                 cpus_per_actor=p.cpus_per_actor,
                                 threads_per_actor=p.threads_per_actor)
            ds = _build_dataset(pending, model=p.model, dst=p.dst, run_id=lock.info.run_id,
                                batch_size=p.batch_size, compile=p.compile,
                                max_pixels=p.max_pixels, res=res,
                                progress=progress, predictor=predictor)
            _drain(ds, dst=p.dst, lock=lock, summary=summary, total=len(pending),
                   on_commit=regrouped.after_commit)
            # Every shard's commit removed its parts; what is left under this run's staging
            # was written by attempts whose answer was lost (a killed actor's call, retried
            # elsewhere). Nothing reads those; they go now rather than at the next run.
            store.clear_staging()
    summary.seconds = time.time() - started
    return summary


def _prepare_run(p: SegmentParams, predictor: type | str) -> None:
    if predictor == DEFAULT_PREDICTOR:
        read_bundle_config(p.model)  # config.json only: a bad bundle fails here, early
    _ensure_ray(p.address)


class _Stopped(Exception):
    pass


class _Listing:
    """Lists the shards at SRC in a thread and notes when the first one not committed in
    DST shows up (a set lookup per shard: committed files are never read); then builds the
    :class:`RegroupedFiles` of the whole listing, still in the thread."""

    def __init__(self, p: SegmentParams, store: OutputStore, done_keys: set[str],
                 skipped: Skipped):
        self._done_keys = done_keys
        self._skipped = skipped
        self._found = threading.Event()  # the first pending shard, or the end of the listing
        self._any_pending = False
        self._stopping = False
        self._result: tuple[list, RegroupedFiles] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(p, store), daemon=True,
                                        name="panoray-listing")
        self._thread.start()

    def _on_shard(self, shard) -> None:
        if self._stopping:
            raise _Stopped
        if not self._any_pending and shard_key(shard.id) not in self._done_keys:
            self._any_pending = True
            self._found.set()

    def _run(self, p: SegmentParams, store: OutputStore) -> None:
        try:
            shards = list_shards(p.src, files_per_shard=p.files_per_shard,
                                 image_column=p.image_column, on_shard=self._on_shard,
                                 exclude=p.dst, skipped=self._skipped)
            self._result = shards, RegroupedFiles(store, shards, self._done_keys)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
            self._error = e
        finally:
            self._found.set()

    def wait_first_pending(self) -> bool:
        """Waits until a shard not yet committed is listed (True) or the listing ends."""
        self._found.wait()
        return self._any_pending

    def result(self) -> tuple[list, RegroupedFiles]:
        """Every shard (sorted by id) and the RegroupedFiles; raises what the listing raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def stop(self) -> None:
        self._stopping = True
        self._thread.join()


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


def _build_dataset(pending, *, model, dst, run_id, batch_size, compile, max_pixels, res, progress,
                   predictor):
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ds = ray.data.from_items([{"shard": dataclasses.asdict(s)} for s in pending],
                             override_num_blocks=max(1, len(pending)))
    # CPU-only predictors: the I/O work runs at a lower priority than the model's threads.
    on_cpus = res.gpus_per_actor == 0
    nice = IO_NICE if on_cpus else 0
    # Every task and every operator costs the driver's scheduler CPU, whatever its size, so
    # there are at most two operators and a task per shard in each (a block: up to Ray Data's
    # target block size). On GPUs reading and decoding share a task on a fraction of a CPU,
    # beside the actors, and the photos travel to them at their original size (the predictor
    # owns the test-time resize). On CPUs the read stage asks for what a predictor actor asks
    # for, so Ray Data fuses it into the actor calls: an actor reads and decodes a shard at a
    # lower priority in one call thread while its model predicts in another, one
    # single-threaded actor per CPU, and the decoded photos never enter the object store (two
    # single-threaded actors on 2 CPUs beat one of two threads beside read tasks: the
    # preempted half of a two-thread team stalls the other).
    read_cpus = res.cpus_per_actor if on_cpus else READ_CPUS
    ds = ds.map_batches(read_decode_stage, batch_size=1, batch_format="pyarrow",
                        num_cpus=read_cpus,
                        fn_kwargs={"max_pixels": max_pixels, "nice": nice,
                                   "rows_per_batch": ROWS_PER_CALL})
    # A predictor actor takes rows_per_call photos per call and per predict() (the predictor
    # makes its own forward batches of batch_size), then encodes the results and writes them
    # as parts in the call's thread while its predictor thread starts on the next batch: id
    # maps never enter the object store, and the GPU is not kept waiting on the PNG encoder.
    # A CPU pool takes whole blocks (a block: at most ROWS_PER_CALL rows of one shard), as
    # they come: a fixed batch size made Ray Data hold blocks back until it had that many rows,
    # and a small job then fed one actor of two. Ray Data refuses a GPU pool without a batch
    # size: there a batch is rows_per_call rows, and one with rows of several shards makes a
    # part per shard.
    rows_per_call = max(batch_size, ROWS_PER_CALL)
    # Ray Data queues up to twice as many calls on an actor as it runs at once. A CPU call
    # takes seconds to minutes: there the queue only lets the actor that is ready first take
    # the blocks of a small job (one of two actors did all four shards) and leaves the others
    # idle at the end of a big one. A GPU call is short: the queue keeps its inputs coming.
    tasks_in_flight = CALLS_PER_ACTOR if on_cpus else None
    return ds.map_batches(
        PredictStage,
        fn_constructor_args=(predictor, model,
                             {"batch_size": batch_size, "threads": res.threads_per_actor,
                              **({"compile": True} if compile else {})}),
        fn_constructor_kwargs={"parts": {"dst": dst, "run_id": run_id, "nice": nice},
                               "rows_per_call": rows_per_call},
        batch_size=rows_per_call if res.gpus_per_actor > 0 else None,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=res.num_actors, max_size=res.num_actors,
                                  max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                  max_tasks_in_flight_per_actor=tasks_in_flight,
                                  enable_true_multi_threading=True),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
    )


def _metadata_blocks(ds):
    """The blocks of metadata rows the pool hands on, as Arrow tables, as they come."""
    # Not iter_batches: its prefetching and re-batching threads cost the driver CPU for
    # blocks of a few rows.
    for bundle in ds.iter_internal_ref_bundles():
        for block in ray.get([entry.ref for entry in bundle.blocks]):
            yield BlockAccessor.for_block(block).to_arrow()


# Commits run on one long-lived actor (a task per commit kept starting fresh workers, each
# importing the storage stack again), COMMIT_THREADS at a time: a commit is a few storage
# requests and some 30 CPU-ms (4 photos), so one committer keeps up with thousands of images a
# second, and every further Ray process costs CPU even when idle. A commit is storage I/O: no
# CPU reservation, so it never waits behind the predictor pool. A commit is idempotent
# (commits.OutputStore.commit_parts), so one whose committer was lost with its node is simply
# sent again, to a fresh committer.
_Committer = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)(Committer)
COMMITTERS = 1
COMMIT_THREADS = 8
COMMIT_ATTEMPTS = 4


@dataclass
class _Commit:
    shard: str
    parts: list[str]
    expected: int
    attempt: int = 1
    slot: int = 0  # which committer it was sent to
    committer: Any = None  # ... and its handle


def _drain(ds, *, dst: str, lock: WriterLock, summary: SegmentSummary, total: int,
           on_commit) -> None:
    """Follow the metadata rows; authorise one commit per shard once all its images are in."""
    progress = ShardProgress()
    commits: dict[ray.ObjectRef, _Commit] = {}
    def new_committer():
        return _Committer.options(max_concurrency=COMMIT_THREADS).remote()

    committers = [new_committer() for _ in range(COMMITTERS)]
    warming = [c.warm.remote(dst) for c in committers]  # settled below, never waited for
    sent = 0
    t0 = time.time()

    def send(c: _Commit) -> None:
        nonlocal sent
        c.slot = sent % len(committers)
        c.committer = committers[c.slot]
        sent += 1
        commits[c.committer.commit.remote(dst, c.shard, c.parts, c.expected,
                                                 OUTPUT_SCHEMA)] = c

    def settle(refs) -> None:
        for ref in refs:
            c = commits.pop(ref)
            try:
                counts = ray.get(ref)  # raises if the commit failed after its retries
            except ray.exceptions.RayActorError as e:
                if c.attempt >= COMMIT_ATTEMPTS:
                    raise
                log.warning("committer of shard %s was lost (%s); committing it again",
                            c.shard, type(e).__name__)
                if committers[c.slot] is c.committer:  # not yet replaced for another commit
                    committers[c.slot] = new_committer()
                send(dataclasses.replace(c, attempt=c.attempt + 1))
                continue
            summary.images_ok += counts["ok"]
            summary.images_failed += counts["failed"]
            summary.shards_done += 1
            on_commit(c.shard)
            rate = (summary.images_ok + summary.images_failed) / max(time.time() - t0, 1e-9)
            log.info("committed shard %s (%d/%d shards, %d images ok, %d failed, %.2f "
                     "images/s)", c.shard, summary.shards_done, total, summary.images_ok,
                     summary.images_failed, rate)

    for batch in _metadata_blocks(ds):
        for row in batch.to_pylist():
            shard = row["shard"]
            if row["kind"] == END:
                progress.add_end(shard, row["end_count"])
            else:
                progress.add_part(shard, row["part"], row["ordinals"])
                for example in row["examples"] or ():
                    if len(summary.failed_examples) < 10:
                        summary.failed_examples.append(example)
            if progress.complete(shard):
                lock.ensure_held()
                parts, expected = progress.pop(shard)
                send(_Commit(shard, parts, expected))
        if commits:  # settle finished commits as we go: errors surface early
            done, _ = ray.wait(list(commits), num_returns=len(commits), timeout=0)
            settle(done)
    while commits:  # a resent commit joins the dict; wait until none is left
        done, _ = ray.wait(list(commits), num_returns=1)
        settle(done)
    for ref in warming:  # read, so that a lost committer's warm-up is no "unhandled error"
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - its commits were sent again and settled above
            pass
    if progress.pending:
        raise RuntimeError(f"{progress.pending} shards did not receive all their rows; re-run "
                           "the job: committed shards are kept and only these are redone")
