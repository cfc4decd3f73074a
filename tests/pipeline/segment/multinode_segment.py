"""Run by test_segment_failures: a segment job on a 3-node local cluster that loses, mid-shard
(right after the first part is staged), a worker node (MODE "node") or the predictor actor's
process (MODE "actor", SIGKILL).

Usage: python multinode_segment.py SRC DST BUNDLE REPORT [MODE]. Writes what happened as JSON to
REPORT (not stdout: the raylets of the killed node share this process's stdout and print to it).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.segment.job import run_segment


def _is_predictor(title: str) -> bool:
    return title.startswith("ray::MapWorker(") and "MapBatches(PredictStage))" in title


def main(src: str, dst: str, bundle: str, report: str, mode: str = "node") -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    killed: dict = {}

    def staged() -> bool:
        try:  # parts come and go under our feet: a vanished folder is no part
            return any(Path(dst, "_staging").rglob("*.parquet"))
        except OSError:
            return False

    def kill_after_first_part() -> None:
        try:
            kill()
        except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
            killed["error"] = repr(e)

    def kill() -> None:
        import psutil

        data = Path(dst) / "data"
        while not staged():
            time.sleep(0.02)
        # The predictor actor's process, found by its title (no state API: it is slow here):
        # "MapWorker(MapBatches(read_decode_stage)->MapBatches(PredictStage))" on CPUs, where Ray
        # Data fuses the read stage into the actor calls.
        actor = next(p for p in psutil.process_iter(["cmdline"])
                     if _is_predictor(" ".join(p.info["cmdline"] or ())))
        killed["committed_before"] = len(list(data.glob("*.parquet")))
        if mode == "actor":
            actor.kill()
            killed["pid"] = actor.pid
        else:  # the worker node whose raylet started the actor, else any worker node
            raylets = {w: w.all_processes["raylet"][0].process.pid for w in workers}
            victim = next((w for w, pid in raylets.items() if pid == actor.ppid()), workers[0])
            killed["had_predictor"] = raylets[victim] == actor.ppid()
            cluster.remove_node(victim, allow_graceful=False)
        killed["at"] = time.time()

    threading.Thread(target=kill_after_first_part, daemon=True).start()
    summary = run_segment(src=src, dst=dst, model=bundle, files_per_shard=2, batch_size=2,
                          num_actors=1, threads_per_actor=1, progress=False)
    Path(report).write_text(json.dumps({
        "killed": killed, "shards_done": summary.shards_done,
        "images_ok": summary.images_ok, "images_failed": summary.images_failed}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:6])
