"""The segment job's driver CPU per image, and its scheduling steps, in one short run.

The job of ``bench/scale.py`` (WebDataset tar shards of 50 JPEGs of 640 x 480 in a local
folder, the zero-cost stand-in predictor of ``bench/standin.py``, one CPU actor on a local
2-CPU Ray), after a one-shard warm-up job, in this process: images/s, the driver's CPU (user +
system of this process) per image and per second, the idle driver's CPU with Ray up, and the
number and mean CPU of Ray Data's scheduling steps (``StreamingExecutor._scheduling_loop_step``,
timed with the thread's CPU clock). Run it from the tree to measure (its own ``pipeline``), e.g.
once in a worktree of an older commit and once here, one after the other.

Run: ``python bench/driver_cpu.py [--images 1000] [--runs 1]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _process_cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images per run (50 a shard)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs, each on a fresh DST")
    args = parser.parse_args()

    import psutil
    import ray
    from ray.data._internal.execution import streaming_executor as executor

    import pipeline.segment.job as job
    from bench import scale, standin

    steps = {"n": 0, "cpu": 0.0}
    step = executor.StreamingExecutor._scheduling_loop_step

    def timed_step(self, topology):
        t = time.thread_time()
        try:
            return step(self, topology)
        finally:
            steps["n"] += 1
            steps["cpu"] += time.thread_time() - t

    executor.StreamingExecutor._scheduling_loop_step = timed_step
    logging.basicConfig(level=logging.WARNING)
    root = tempfile.mkdtemp(prefix="panoray-driver-cpu-")
    folders, _ = scale.make_sources(root, {"warm": 1, "main": max(1, args.images // 50)}, 50)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = dict(model="standin://none", batch_size=4, progress=False,
                  predictor=standin.StandIn, num_actors=None, gpus_per_actor=0)
    job.run_segment(src=folders["warm"], dst=os.path.join(root, "out-warm"), **common)
    me = psutil.Process()
    time.sleep(1.0)
    c0 = _process_cpu(me)
    time.sleep(4.0)
    print(f"idle driver with Ray up: {1000 * (_process_cpu(me) - c0) / 4:.1f} CPU-ms/s")
    print("| run | images | images/s | driver CPU ms/image | driver CPU ms/s | steps/s | "
          "CPU ms/step |")
    print("|---|---|---|---|---|---|---|")
    for k in range(args.runs):
        steps.update(n=0, cpu=0.0)
        c0, w0 = _process_cpu(me), time.perf_counter()
        summary = job.run_segment(src=folders["main"], dst=os.path.join(root, f"out-{k}"),
                                  **common)
        wall, cpu = time.perf_counter() - w0, _process_cpu(me) - c0
        images = summary.images_ok + summary.images_failed
        print(f"| {k + 1} | {images} | {images / wall:.1f} | {1000 * cpu / images:.2f} | "
              f"{1000 * cpu / wall:.0f} | {steps['n'] / wall:.1f} | "
              f"{1000 * steps['cpu'] / max(steps['n'], 1):.2f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
