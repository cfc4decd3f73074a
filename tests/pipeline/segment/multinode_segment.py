"""Run by test_segment_failures: a segment job on a 3-node local cluster that loses a node.

Usage: python multinode_segment.py SRC DST BUNDLE REPORT. Writes what happened as JSON to REPORT
(not stdout: the raylets of the killed node share this process's stdout and print to it).
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


def main(src: str, dst: str, bundle: str, report: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    killed: dict = {}

    def kill_a_node_after_first_commit() -> None:
        data = Path(dst) / "data"
        while not (data.exists() and any(data.glob("*.parquet"))):
            time.sleep(0.1)
        from ray.util.state import list_actors

        actor_nodes = {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")])
                       if "MapWorker" in (a.class_name or "")}
        victim = next((w for w in workers if w.node_id in actor_nodes), workers[0])
        killed["had_predictor"] = victim.node_id in actor_nodes
        killed["committed_before"] = len(list(data.glob("*.parquet")))
        cluster.remove_node(victim, allow_graceful=False)
        killed["at"] = time.time()

    threading.Thread(target=kill_a_node_after_first_commit, daemon=True).start()
    summary = run_segment(src=src, dst=dst, model=bundle, files_per_shard=2, batch_size=2,
                          num_actors=1, threads_per_actor=1, progress=False)
    Path(report).write_text(json.dumps({
        "killed": killed, "shards_done": summary.shards_done,
        "images_ok": summary.images_ok, "images_failed": summary.images_failed}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
