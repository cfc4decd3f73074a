"""End-to-end efficiency of the segment job: S3 archive -> Ray Data -> Parquet on S3.

Compares, on the same images and the same machine:
- bare: `PanopticPredictor.predict` in one process, images already decoded in memory, all
  threads of the machine (the best the model can do here);
- job: `run_segment` from WebDataset tar shards on a moto S3 server (loopback) to Parquet on
  the same server, on a local Ray with the default sizing (on a CPU: one single-threaded
  predictor actor per core, each reading, decoding, encoding and writing its own shards;
  ``--num-actors 1 --threads-per-actor 2`` for one actor of two threads).

Reports images/s of both and the efficiency ratio (job / bare). Steady state: all the job's
images over the time from the start of the predictor's first call (``bench/timed_predictor.py``
notes it) to the last shard commit, so the one-off costs before the model's first batch
(listing, Ray start, actor start, model load) are left out, and what the I/O stages still do
after the model's last batch (encode, commit) is counted. Beside it, the model's own rate inside
the job (its first call's start to its last call's end) and the whole-run rate; where the CPU
went over the steady-state window, process by process (``bench/proc_cpu.py``: the predictor
actor, the Ray workers running read + decode and commits, the driver, raylet, GCS, the S3
server). Peak resident memory: the bare process; the job's driver, all Ray processes and the S3
server, sampled every second.
Default: `r50-coco-panoptic` (random weights) at 384 x 384.

Run: ``python bench/segment_job.py [--preset r50-coco-panoptic] [--images 96] [--size 384]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import sys
import tempfile
import time

import torch
from pictures import smooth_jpegs
from proc_cpu import ProcessCPU
from s3_server import s3_server
from timed_predictor import read_times


def _time_bare(bundle: str, jpegs: list[bytes], batch_size: int, threads: int,
               ready=None) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) of one bare predictor over `jpegs`, decoded in
    memory first (it resizes them itself, as in the job), after a warm-up; `ready`: a barrier
    to wait at before the clock starts."""
    from pipeline.segment.decode import decode_image
    from pipeline.segment.predictor import PanopticPredictor

    predictor = PanopticPredictor(bundle, batch_size=batch_size, threads=threads)
    arrays = [decode_image(b).array for b in jpegs]
    predictor.predict([arrays[0]])  # warm-up
    if ready is not None:
        ready.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, len(arrays), batch_size):
        predictor.predict(arrays[i:i + batch_size])
    return time.perf_counter() - t0, time.process_time() - cpu0


def _bare_share(bundle: str, jpegs: list[bytes], batch_size: int, ready, results) -> None:
    """One single-threaded bare predictor over its share of the photos (a spawned process)."""
    results.put(_time_bare(bundle, jpegs, batch_size, 1, ready))


def _bare_processes(bundle: str, jpegs: list[bytes], procs: int,
                    batch_size: int) -> tuple[float, float]:
    """(seconds until the last of `procs` single-threaded predictors, started together, is
    through its share of `jpegs`; their CPU seconds)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_bare_share,
                           args=(bundle, jpegs[i::procs], batch_size, ready, results))
               for i in range(procs)]
    for w in workers:
        w.start()
    done = [results.get() for _ in workers]
    for w in workers:
        w.join()
    return max(s for s, _ in done), sum(c for _, c in done)


class CommitTimes(logging.Handler):
    """(wall-clock time, images committed so far) at each "committed shard" record of the
    job's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.points: list[tuple[float, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("committed shard"):
            ok, failed = record.args[3], record.args[4]
            self.points.append((time.time(), ok + failed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="r50-coco-panoptic")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--per-shard", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-actors", type=int, default=None,
                        help="predictor actors (default: the job's sizing)")
    parser.add_argument("--cpus-per-actor", type=float, default=None)
    parser.add_argument("--threads-per-actor", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    # the S3 server runs in a process of its own: its CPU is counted apart from the driver's
    with s3_server() as (server, endpoint):
        run(args, server, endpoint)


def run(args: argparse.Namespace, server, endpoint: str) -> None:
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
                      AWS_ENDPOINT_URL_S3=endpoint)
    import boto3

    from model.bundle import save_bundle
    from model.config import get_config
    from model.mask2former import build_model
    from model.ops import has_compiled_op
    from pipeline.segment.tar import tar_bytes

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    config = get_config(args.preset)
    config = dataclasses.replace(config, inference=dataclasses.replace(
        config.inference, min_size=args.size, max_size=args.size))
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="panoray-bench-")
    bundle = os.path.join(tmp, "bundle")
    save_bundle(build_model(config), bundle)
    images = smooth_jpegs(args.images, args.size, args.size)
    for start in range(0, len(images), args.per_shard):
        members = {f"img{i:05d}.jpg": images[i]
                   for i in range(start, min(start + args.per_shard, len(images)))}
        s3.put_object(Bucket="bench", Key=f"archive/shard-{start:05d}.tar",
                      Body=tar_bytes(members))
    threads = os.cpu_count() or 1
    print(f"{args.preset} at {args.size}x{args.size}, {args.images} images, {threads} threads, "
          f"compiled op: {has_compiled_op()}")

    # bare predictor, photos decoded in memory (it resizes them itself, as in the job): one
    # process with every thread, then one single-threaded process per core side by side (on a
    # CPU the faster of the two is the best the model does here; the job can run either way)
    bare_s, bare_cpu = _time_bare(bundle, images, args.batch_size, threads)
    bare_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    split_s, split_cpu = _bare_processes(bundle, images, threads, args.batch_size)
    bares = [(f"bare, 1 process x {threads} threads", len(images) / bare_s, bare_s, bare_cpu),
             (f"bare, {threads} processes x 1 thread", len(images) / split_s, split_s, split_cpu)]
    _, bare_rate, _, bare_cpu = max(bares, key=lambda b: b[1])

    # the job
    import ray

    from pipeline.segment.job import run_segment

    # the actors import bench.timed_predictor: the repo root goes on their path (set before
    # Ray starts: workers inherit this environment)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                               if p)
    sys.path.insert(0, root)
    times_path = os.path.join(tmp, "predict-times.txt")
    os.environ["PANORAY_BENCH_TIMES"] = times_path
    ray.init(include_dashboard=False, log_to_driver=False)
    commits = CommitTimes()
    job_log = logging.getLogger("pipeline.segment.job")
    job_log.addHandler(commits)
    job_log.setLevel(logging.INFO)
    sizing = {k: v for k, v in (("num_actors", args.num_actors),
                                ("cpus_per_actor", args.cpus_per_actor),
                                ("threads_per_actor", args.threads_per_actor)) if v is not None}
    with ProcessCPU() as procs:
        procs.watch(server.pid, "S3 server (moto)")
        t0, t_start = time.perf_counter(), time.time()
        summary = run_segment(src="s3://bench/archive", dst="s3://bench/out", model=bundle,
                              batch_size=args.batch_size, progress=False,
                              predictor="bench.timed_predictor:TimedPredictor", **sizing)
        whole_s = time.perf_counter() - t0
    job_log.removeHandler(commits)
    ray.shutdown()
    whole_n = summary.images_ok
    assert summary.images_failed == 0, summary.render()
    assert whole_n == len(images), (whole_n, len(images))
    calls = read_times(times_path)
    first_start, last_end = calls[0][0], max(c[1] for c in calls)
    last_commit = commits.points[-1][0]
    steady_s = last_commit - first_start
    steady_rate = whole_n / steady_s
    model_rate = sum(c[2] for c in calls) / (last_end - first_start)
    busy = sum(c[1] - c[0] for c in calls)
    print(f"predictor actor during its calls: {sum(c[3] for c in calls) / busy:.2f} cores busy "
          f"on average, torch threads {sorted({c[4] for c in calls})}; bare: "
          f"{bares[0][3] / bare_s:.2f} cores")
    whole_rate = whole_n / whole_s
    print(f"steady-state window: {len(calls)} predictor calls from {first_start - t_start:.1f} s "
          f"into the run; the model's last call ended {last_end - first_start:.1f} s later, "
          f"the last commit {steady_s:.1f} s later")
    for pid in {c[5] for c in calls}:
        procs.name(pid, "predictor actor")
    cpu = procs.by_role(first_start, last_commit)
    print(f"CPU over the steady-state window ({steady_s:.1f} s x {threads} cores = "
          f"{steady_s * threads:.0f} core-s), by process:")
    print(f"  {'':28s} {'core-s':>7s} {'cores':>6s} {'CPU-ms/image':>13s}")
    for role, secs in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {role:28s} {secs:7.1f} {secs / steady_s:6.2f} {1000 * secs / whole_n:13.0f}")
    total = sum(cpu.values())
    print(f"  {'all':28s} {total:7.1f} {total / steady_s:6.2f} {1000 * total / whole_n:13.0f}"
          f"   (best bare: {1000 * bare_cpu / len(images):.0f} CPU-ms/image)")
    rows = [
        (bares[0][0], bares[0][1], bares[0][2], bare_rss),
        (bares[1][0], bares[1][1], bares[1][2], None),  # RSS: not sampled across processes
        ("segment job, steady state", steady_rate, steady_s, procs.peak_rss),
        ("  its model alone (calls)", model_rate, last_end - first_start, procs.peak_rss),
        ("segment job, whole run", whole_rate, whole_s, procs.peak_rss),
    ]
    print(f"{'':32s} {'images/s':>9s} {'seconds':>8s} {'peak RSS':>10s} {'vs bare':>8s}")
    for name, rate, seconds, rss in rows:
        shown = f"{rss / 2**30:6.2f} GiB" if rss else f"{'-':>10s}"
        print(f"{name:32s} {rate:9.3f} {seconds:8.1f} {shown} {rate / bare_rate:7.2f}x")
    print(f"efficiency (steady state, vs the faster bare): {steady_rate / bare_rate:.2f}  "
          f"(target >= 0.95)")


if __name__ == "__main__":
    main()
