"""The long fault campaign of the segment job (tests/pipeline/segment/test_fault_campaign.py runs
one short trial in CI).

    .venv/bin/python bench/faults.py [--trials 6] [--seed 0]

A moto S3 server on loopback holds a small archive (tar shards and loose JPEGs). A clean run
gives the reference output. Then each seeded trial puts the fault-injecting proxy
(tests/s3_fault_proxy.py) between `panoray segment` and the store, at seeded random rates of
503 SlowDown, 500, connection resets before and after the store applies a request and slow
answers, and SIGKILLs the driver and / or the predictor actor after a random number of commits;
the job is run again, faults still on, until it ends well. The output must equal the clean
run's: the same ids, none twice, the same status and PNG bytes. Prints one line per trial and
the totals. (Worker nodes removed mid-run: tests/pipeline/segment/multinode_segment.py.)
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "pipeline" / "segment")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "AWS_ENDPOINT_URL_S3": endpoint})
    import ray
    from fault_campaign import clean_run, make_archive, trial
    from segment_helpers import tiny_bundle

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = tiny_bundle(f"{tmp}/bundle")
        src = "s3://bench/in"
        ids = make_archive(src, tars=4, per_tar=8, loose=16)
        reference = clean_run(src, "s3://bench/clean", bundle)
        ray.shutdown()  # each trial's job starts a Ray of its own
        assert [r[0] for r in reference] == ids, "the clean run lost rows"
        print(f"archive: {len(ids)} images in 4 tars + 16 loose files; clean run: "
              f"{len(reference)} rows")
        print(f"{'trial':>5} {'runs':>4} {'driver':>6} {'actor':>5} {'faults':>6}  "
              f"{'rows':>4} {'dup':>3} {'lost':>4} {'diff':>4} {'s':>6}  injected")
        totals = dict(trials=0, runs=0, driver=0, actor=0, faults=0, rows=0, bad=0)
        rng = random.Random(args.seed)
        for n in range(args.trials):
            seed = args.seed * 1000 + n
            kill_driver, kill_actor = rng.choice([(True, False), (False, True), (True, True)])
            scale = rng.uniform(0.5, 2.0)
            rates = {"slowdown": 0.03 * scale, "error": 0.03 * scale, "reset": 0.02 * scale,
                     "reset_after": 0.02 * scale, "slow": 0.03 * scale}
            t = trial(seed, src=src, dst=f"s3://bench/out-{seed}", bundle=bundle,
                      upstream=endpoint, reference=reference, shards=12,
                      kill_driver=kill_driver, kill_actor=kill_actor, rates=rates)
            injected = sum(t.faults.values())
            print(f"{n:>5} {t.runs:>4} {t.driver_kills:>6} {t.actor_kills:>5} {injected:>6}  "
                  f"{t.rows:>4} {t.duplicates:>3} {t.missing:>4} {t.differing:>4} "
                  f"{t.seconds:>6.1f}  {t.faults}", flush=True)
            if not t.ok:
                print(t.log_tail)
            totals["trials"] += 1
            totals["runs"] += t.runs
            totals["driver"] += t.driver_kills
            totals["actor"] += t.actor_kills
            totals["faults"] += injected
            totals["rows"] += t.rows
            totals["bad"] += t.duplicates + t.missing + t.differing
        print(f"total: {totals['trials']} trials, {totals['runs']} job runs, "
              f"{totals['driver']} driver kills, {totals['actor']} predictor-actor kills, "
              f"{totals['faults']} S3 faults injected, {totals['rows']} rows checked, "
              f"{totals['bad']} duplicates / losses / differences")
    server.stop()
    sys.exit(1 if totals["bad"] else 0)


if __name__ == "__main__":
    main()
