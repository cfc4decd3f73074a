"""Segment at cluster scale: the real segment job around a stand-in predictor, cost per image.

Runs ``run_segment`` (read + decode -> predictor pool, which encodes and stages parts -> one
commit per shard)
over WebDataset tar shards of 640 x 480 JPEGs in a local folder, with the stand-in predictor
of ``bench/standin.py`` (a fixed service time per image, a fixed three-segment answer), on
(a) one local node (``ray.init(num_cpus=2)``, one CPU predictor actor) and (b) a three-node
``ray.cluster_utils.Cluster`` on loopback (head + two workers with a fake ``num_gpus=1`` each,
``gpus_per_actor=1``: two "GPU" actors). Every run is its own process (its own Ray), after a
one-shard warm-up job that starts Ray's workers. Printed, as Markdown tables:

1. images/s through the whole job (listing, actor start and the last commit included);
2. CPU-ms per image per stage: user + system CPU time of every Ray process, sampled every
   0.2 s with psutil and grouped by process title (``MapBatches(read_decode_stage)``, the
   ``MapWorker(...)`` predictor actors, which also encode and write the parts, the committers;
   before: ``FlatMap(read_shard)``, ``MapBatches(decode_stage)``, ``stage_parts`` /
   ``encode_stage`` tasks; raylet / GCS / agents as "Ray system"), divided by the images; beside
   it Ray Data's own per-operator CPU time (``cpu_time`` of its stats) as a cross-check;
3. driver CPU-ms per image (this process, user + system, during ``run_segment``, less the
   sampling thread);
4. peak driver RSS over a run of --images and one of --big-images, and the difference;
5. object-store bytes per image per hop: an estimate from what each stage ships, and what Ray
   Data measured (``output_size_bytes`` of each operator's blocks);

then a capacity table (CPU cores per GPU at 25 / 50 / 100 images/s per GPU; GPUs one driver
feeds), and the code before this work (commit 82bf6a7, ``--old``, default ``/tmp/old`` when it
is there: ``git worktree add /tmp/old 82bf6a7`` and ``cp model/_C.abi3.so /tmp/old/model/``)
measured the same way, with the issue's figures quoted as "before (issue)".

Run: ``python bench/scale.py [--images 1000] [--big-images 5000] [--shards N]
[--service-ms 0,20] [--cluster-service-ms 0,40] [--cluster {local,cluster,both}] [--old DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from pictures import smooth_jpegs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEIGHT = 640, 480
MARK = "SCALE-RESULT "

# The issue's figures for the code before (2 CPUs, 20 tar shards x 50 JPEGs 640 x 480, test
# size 800 / 1333, zero-cost stand-in).
ISSUE = {"images_s": 29.7, "driver_ms": 2.5, "encode_ms": 27.0, "decode_ms": 12.0}

# "predict actor" is the predictor actors' processes: since the two-operator job, that includes
# encoding the results and writing the parts (their call threads); before, tasks did that.
STAGES = ["read", "decode", "read + decode", "predict actor", "encode + parts", "commit",
          "start-up / idle", "other ray::", "Ray system"]
WORK_STAGES = ["read", "decode", "read + decode", "predict actor", "encode + parts", "commit"]


def stage_of(title: str) -> str:
    if not title.startswith("ray::"):
        return "Ray system"
    if title.split()[0].endswith(".__init__") or title.startswith("ray::IDLE"):
        return "start-up / idle"  # an actor's constructor (imports...), a worker's start
    if "MapWorker" in title or "PredictStage" in title or "StandIn" in title:
        return "predict actor"
    if "read_decode_stage" in title:
        return "read + decode"
    if "read_shard" in title:
        return "read"
    if "decode_stage" in title:
        return "decode"
    if "stage_parts" in title or "encode_stage" in title:
        return "encode + parts"
    if "commit_shard_parts" in title:
        return "commit"
    return "other ray::"


# --------------------------------------------------------------------------------------------
# data


def make_sources(root: str, counts: dict[str, int], per_shard: int) -> tuple[dict, float]:
    """One folder of `n` shards per name; every shard is a hard link of one tar (its id is its
    name, so they are distinct inputs). Returns ({name: folder}, mean JPEG bytes)."""
    from pipeline.segment.tar import tar_bytes

    pictures = smooth_jpegs(8, WIDTH, HEIGHT)
    members = {f"img{i:05d}.jpg": pictures[i % len(pictures)] for i in range(per_shard)}
    master = os.path.join(root, "shard.tar")
    with open(master, "wb") as f:
        f.write(tar_bytes(members))
    folders = {}
    for name, n in counts.items():
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for k in range(n):
            path = os.path.join(folder, f"shard-{k:05d}.tar")
            try:
                os.link(master, path)
            except OSError:
                shutil.copyfile(master, path)
        folders[name] = folder
    return folders, float(np.mean([len(members[k]) for k in members]))


# --------------------------------------------------------------------------------------------
# one run (a child process)


class Sampler:
    """CPU time of every process below this one, by title, plus this process's peak RSS."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.interval = interval
        self.by_stage = {s: 0.0 for s in STAGES}
        self.titles: dict[str, float] = {}
        self._last: dict[int, float] = {}
        self._work_title: dict[int, str] = {}
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-sampler", daemon=True)
        self.native_id: int | None = None
        self.counting = False

    def snapshot(self) -> None:
        self.peak_rss = max(self.peak_rss, self.me.memory_info().rss)
        for p in self.me.children(recursive=True):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cpu = t.user + t.system
                    title = " ".join(p.cmdline())[:120] or p.name()
            except self.psutil.Error:
                continue
            if "default_worker.py" in title:  # a worker starting, before it names itself
                title = "ray::IDLE (worker start-up)"
            elif not title.startswith("ray::"):
                title = os.path.basename(title.split()[0]) if title.split() else p.name()
            before = self._last.get(p.pid)
            self._last[p.pid] = cpu
            if not self.counting:
                continue
            delta = cpu - (before if before is not None else 0.0)
            stage = stage_of(title)
            if stage in WORK_STAGES:
                self._work_title[p.pid] = title
            elif stage == "start-up / idle" and p.pid in self._work_title:
                # between two tasks: the time belongs to the work it was doing
                title = self._work_title[p.pid]
                stage = stage_of(title)
            self.by_stage[stage] += delta
            key = title.split("(")[0] if stage == "Ray system" else title
            self.titles[key] = self.titles.get(key, 0.0) + delta

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        while not self._stop.wait(self.interval):
            self.snapshot()

    def thread_cpu(self) -> float:
        for t in self.me.threads():
            if t.id == self.native_id:
                return t.user_time + t.system_time
        return 0.0

    def start(self) -> None:
        self.snapshot()  # baselines of the processes already there
        self.counting = True
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.snapshot()


def _ray_data_stats(ds) -> dict[str, dict[str, float]]:
    """Per Ray Data operator: summed task CPU seconds, output bytes and rows."""
    out: dict[str, dict[str, float]] = {}
    try:
        summary = ds._get_stats_summary()
    except Exception as e:  # noqa: BLE001  (internal API: a benchmark reports, never fails)
        return {"error": {"message": str(e)}}
    todo = [summary]
    while todo:
        s = todo.pop()
        todo.extend(s.parents or [])
        for op in s.operators_stats:
            entry = out.setdefault(op.operator_name, {"cpu_s": 0.0, "bytes": 0.0, "rows": 0.0})
            if op.cpu_time is not None:
                entry["cpu_s"] += float(op.cpu_time.sum)
            if op.output_size_bytes is not None:
                entry["bytes"] += float(op.output_size_bytes.sum)
            if op.output_num_rows is not None:
                entry["rows"] += float(op.output_num_rows.sum)
    return out


def _old_bundle(folder: str) -> str:
    """A tiny bundle in the old tree's format, test size 800 / 1333 (as in the issue)."""
    import dataclasses

    import torch

    from model import build_model, get_config, save_bundle

    config = get_config("tiny")
    config = dataclasses.replace(config, inference=dataclasses.replace(
        config.inference, min_size=800, max_size=1333))
    torch.manual_seed(0)
    save_bundle(build_model(config), folder)
    return folder


def run_one(cfg: dict) -> dict:
    import logging

    import psutil
    import ray

    logging.basicConfig(level=logging.WARNING)
    old = cfg["code"] == "old"
    from bench import standin

    if old:
        import pipeline.segment as jobmod  # the old tree: one module

        jobmod.PanopticPredictor = standin.OldStandIn
        model = _old_bundle(os.path.join(cfg["work"], "bundle"))
        extra: dict = {}
    else:
        import pipeline.segment.job as jobmod

        model = "standin://none"
        extra = {"predictor": standin.StandIn}
    captured = []
    original_drain = jobmod._drain

    def drain(ds, *args, **kwargs):
        captured.append(ds)
        return original_drain(ds, *args, **kwargs)

    jobmod._drain = drain

    cluster = None
    if cfg["mode"] == "cluster":
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 2, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=2, num_gpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        pool = {"num_actors": 2, "gpus_per_actor": 1}
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        pool = {"num_actors": None, "gpus_per_actor": 0}
    try:
        common = dict(model=model, batch_size=cfg["batch_size"], progress=False, **pool, **extra)
        jobmod.run_segment(src=cfg["warmup_src"], dst=os.path.join(cfg["work"], "warm"),
                           **common)
        captured.clear()
        time.sleep(1.0)
        me = psutil.Process()
        sampler = Sampler()
        rss0 = me.memory_info().rss
        sampler.start()
        t = me.cpu_times()
        cpu0, t0 = t.user + t.system, time.perf_counter()
        summary = jobmod.run_segment(src=cfg["src"], dst=os.path.join(cfg["work"], "out"),
                                     **common)
        wall = time.perf_counter() - t0
        t = me.cpu_times()
        cpu1 = t.user + t.system
        # tasks still winding down (a last commit, block release) land in the totals
        time.sleep(0.5)
        sampler.stop()
        driver_cpu = cpu1 - cpu0 - sampler.thread_cpu()
        images = summary.images_ok + summary.images_failed
        stats = _ray_data_stats(captured[0]) if captured else {}
        return {
            "images": images, "failed": summary.images_failed, "seconds": wall,
            "images_s": images / wall, "driver_cpu_s": driver_cpu,
            "rss0": rss0, "peak_rss": sampler.peak_rss, "stages": sampler.by_stage,
            "titles": sampler.titles, "ray_data": stats,
            "nodes": len(ray.nodes()), "actors": 2 if cluster else 1,
        }
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


# --------------------------------------------------------------------------------------------
# the benchmark (the parent process)


def launch(cfg: dict, *, timeout: float) -> dict | None:
    env = dict(os.environ)
    env["PANORAY_STANDIN_MS"] = str(cfg["service_ms"])
    path = [cfg["tree"], ROOT] if cfg["code"] == "old" else [ROOT]
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--run", json.dumps(cfg)]
    started = time.time()
    try:
        proc = subprocess.run(cmd, env=env, cwd=cfg["tree"], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {cfg['label']}: timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
            print(f"  {cfg['label']}: {result['images']} images, {result['images_s']:.1f} "
                  f"images/s ({time.time() - started:.0f} s with start-up)", file=sys.stderr)
            return result
    print(f"  {cfg['label']}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}",
          file=sys.stderr)
    return None


def _ms(result: dict, stage: str) -> float:
    return 1000.0 * result["stages"].get(stage, 0.0) / result["images"]


def _driver_ms(result: dict) -> float:
    return 1000.0 * result["driver_cpu_s"] / result["images"]


def _around_model_ms(result: dict) -> float:
    """CPU per image of every stage but the model: read, decode, encode + parts, commit, the
    predictor actor's host work (Ray Data plumbing, id-map narrowing; the stand-in sleeps)."""
    return sum(_ms(result, s) for s in WORK_STAGES)


def _rd_ms(result: dict, word: str) -> str:
    for name, entry in result.get("ray_data", {}).items():
        if word in name and "cpu_s" in entry:
            return f"{1000.0 * entry['cpu_s'] / result['images']:.2f}"
    return "-"


def _rd_bytes(result: dict, word: str) -> str:
    for name, entry in result.get("ray_data", {}).items():
        if word in name and "bytes" in entry:
            return f"{entry['bytes'] / result['images']:,.0f}"
    return "-"


def _ratio(new: float, old: float | None, *, higher_better: bool = True) -> str:
    if not old or not new:
        return "-"
    return f"{(new / old if higher_better else old / new):.2f}x"


def driver_fit(new: list[tuple[dict, dict]]) -> tuple[float, float, tuple[str, str]] | None:
    """Driver CPU as a ms per image + b ms per second, from two local runs of the same images
    at different service times (so different lengths); None without such a pair."""
    local = [(c, r) for c, r in new if c["mode"] == "local"]
    for i, (c1, r1) in enumerate(local):
        for c2, r2 in local[i + 1:]:
            if r1["images"] == r2["images"] and abs(r2["seconds"] - r1["seconds"]) > 2.0:
                b = (r2["driver_cpu_s"] - r1["driver_cpu_s"]) / (r2["seconds"] - r1["seconds"])
                a = (r1["driver_cpu_s"] - b * r1["seconds"]) / r1["images"]
                return 1000.0 * max(a, 0.0), 1000.0 * max(b, 0.0), (c1["label"], c2["label"])
    return None


def driver_capacity(fit: tuple[float, float, tuple[str, str]]) -> float:
    """Images/s at which the driver's fitted CPU use reaches one core."""
    per_image, per_second, _ = fit
    return (1000.0 - per_second) / per_image if per_image > 0 else float("inf")


def print_tables(runs: list[tuple[dict, dict]], jpeg_bytes: float, per_shard: int) -> None:
    new = [(c, r) for c, r in runs if c["code"] == "new"]
    old = [(c, r) for c, r in runs if c["code"] == "old"]
    old0 = next((r for c, r in old if c["service_ms"] == 0), None)

    print("\n## 1. Throughput (whole job)\n")
    print("| run | nodes | predictor actors | service ms/image | images | seconds | images/s "
          "| vs before (issue, 29.7) | vs before (measured) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, r in runs:
        same_old = next((o for oc, o in old if oc["service_ms"] == c["service_ms"]
                         and oc["mode"] == c["mode"] and oc["images"] == c["images"]), None)
        vs_issue = _ratio(r["images_s"], ISSUE["images_s"]) \
            if c["service_ms"] == 0 and c["mode"] == "local" and c["code"] == "new" else "-"
        vs_old = _ratio(r["images_s"], same_old["images_s"]) \
            if same_old and c["code"] == "new" else "-"
        print(f"| {c['label']} | {r['nodes']} | {r['actors']} | {c['service_ms']:g} | "
              f"{r['images']} | {r['seconds']:.1f} | {r['images_s']:.1f} | {vs_issue} | "
              f"{vs_old} |")
    print(f"\nbefore (issue): {ISSUE['images_s']} images/s on the old code, 2 CPUs, 20 x 50 "
          "JPEGs 640 x 480, zero-cost stand-in.")

    print("\n## 2. CPU-ms per image per stage (process CPU time, user + system, by process "
          "title)\n")
    print("| run | " + " | ".join(STAGES) + " | driver | all |")
    print("|---|" + "---|" * (len(STAGES) + 2))
    for c, r in runs:
        cells = [f"{_ms(r, s):.2f}" for s in STAGES]
        total = sum(_ms(r, s) for s in STAGES) + _driver_ms(r)
        print(f"| {c['label']} | " + " | ".join(cells) + f" | {_driver_ms(r):.2f} | "
              f"{total:.2f} |")
    print("\nRay Data's own CPU time per operator (task-side `cpu_time`, ms/image; a "
          "cross-check of the process figures):\n")
    print("| run | read_shard | decode_stage | read_decode_stage | predictor (MapBatches; "
          "+ encode + parts after) | encode_stage |")
    print("|---|---|---|---|---|---|")
    for c, r in runs:
        pred = "PredictStage" if c["code"] == "new" else "StandIn"
        print(f"| {c['label']} | {_rd_ms(r, 'FlatMap(read_shard')} | "
              f"{_rd_ms(r, '(decode_stage')} | {_rd_ms(r, 'read_decode_stage')} | "
              f"{_rd_ms(r, pred)} | {_rd_ms(r, 'encode_stage')} |")
    n0 = next((r for c, r in new if c["service_ms"] == 0 and c["mode"] == "local"), None)
    if old0 and n0:
        print("\nSide by side, zero-cost stand-in, local node (ms/image; ratio = before / "
              "after):\n")
        print("| stage | before (issue) | before (measured) | after | ratio (measured) |")
        print("|---|---|---|---|---|")
        rows = [("read + decode (+ resize before)", ("read", "decode", "read + decode"),
                 ISSUE["decode_ms"]),
                ("predict actor (host) + encode", ("predict actor", "encode + parts"),
                 ISSUE["encode_ms"]),
                ("commit", ("commit",), None)]
        for name, stages, issue in rows:
            b, a = (sum(_ms(x, stage) for stage in stages) for x in (old0, n0))
            print(f"| {name} | {issue if issue is not None else '-'} | {b:.2f} | {a:.2f} | "
                  f"{_ratio(a, b, higher_better=False)} |")
        b, a = _driver_ms(old0), _driver_ms(n0)
        print(f"| driver | {ISSUE['driver_ms']} | {b:.2f} | {a:.2f} | "
              f"{_ratio(a, b, higher_better=False)} |")
        b, a = _around_model_ms(old0) + _driver_ms(old0), _around_model_ms(n0) + _driver_ms(n0)
        print(f"| all around the model (stages + driver) | - | {b:.2f} | {a:.2f} | "
              f"{_ratio(a, b, higher_better=False)} |")

    print("\n## 3-4. Driver: CPU and memory\n")
    print("| run | images | driver CPU ms/image | driver RSS before MiB | peak driver RSS MiB "
          "| peak - before MiB |")
    print("|---|---|---|---|---|---|")
    for c, r in runs:
        mib = 1 / 2**20
        print(f"| {c['label']} | {r['images']} | {_driver_ms(r):.2f} | {r['rss0'] * mib:.0f} "
              f"| {r['peak_rss'] * mib:.0f} | {(r['peak_rss'] - r['rss0']) * mib:.1f} |")
    local0 = sorted([(r["images"], r) for c, r in new
                     if c["service_ms"] == 0 and c["mode"] == "local"], key=lambda x: x[0])
    if len(local0) >= 2:
        (n1, r1), (n2, r2) = local0[0], local0[-1]
        grow = (r2["peak_rss"] - r1["peak_rss"]) / 2**20
        per_k = grow / max(n2 - n1, 1) * 1000
        print(f"\nPeak driver RSS, {n1} -> {n2} images: {r1['peak_rss'] / 2**20:.0f} -> "
              f"{r2['peak_rss'] / 2**20:.0f} MiB ({grow:+.1f} MiB, {per_k:+.2f} MiB per 1,000 "
              f"images): {'flat' if abs(per_k) < 1.0 else 'grows'} with the number of images "
              "(runs in separate processes; the difference includes Ray's own noise).")

    fit = driver_fit(new)
    if fit:
        per_image, per_second, (c1, c2) = fit
        print(f"\nDriver CPU = {per_image:.3f} ms per image + {per_second:.1f} ms per second of "
              f"the job (a fit through '{c1}' and '{c2}': same images, different service "
              "times). The per-second part is Ray Data's scheduling loop (a step at least every "
              "0.1 s), whatever the rate; the per-image part is what grows with a cluster's rate. "
              f"One driver core is used up at about {driver_capacity(fit):,.0f} images/s.")

    print("\n## 5. Object-store bytes per image\n")
    meta = 250  # routing columns of a row: ids, uri, shard, kind, ordinal... (estimate)
    seg_json = len(json.dumps([{"id": 1, "category_id": 1, "isthing": True, "score": 0.9}] * 3))
    parts_meta = 8 + 300 / per_shard  # ordinals (8 B each) + a part row per shard (estimate)
    print("| hop | estimate after (B) | measured after (Ray Data) | estimate before (B) | "
          "measured before (Ray Data) |")
    print("|---|---|---|---|---|")
    test_h, test_w = 800, 800 * WIDTH // HEIGHT
    # after: read and decode share a task, and the predictor actors encode: two hops
    hops = [
        ("read -> decode (JPEG + row)", None, None, jpeg_bytes + meta, "read_shard"),
        ("decode -> predictor (photo)", WIDTH * HEIGHT * 3 + meta, "read_decode_stage",
         test_h * test_w * 3 + meta, "decode_stage"),
        ("predictor -> encode (id map)", None, None,
         WIDTH * HEIGHT * 4 + seg_json + meta, "StandIn"),
        ("encode -> driver", parts_meta, "PredictStage", None, "encode_stage"),
    ]
    for name, est, word, est_old, word_old in hops:
        if est is None:
            m_new, est = "none (same task)", 0
        else:
            m_new = _rd_bytes(n0, word) if n0 else "-"
        m_old = _rd_bytes(old0, word_old) if old0 else "-"
        e_old = f"{est_old:,.0f}" if est_old is not None else "PNG + segments_info + columns"
        print(f"| {name} | {est:,.0f} | {m_new} | {e_old} | {m_old} |")
    print(f"\nEstimates: JPEG {jpeg_bytes:,.0f} B (mean of the shard's members); photo {WIDTH} x "
          f"{HEIGHT} x 3 uint8 (after; the predictor resizes on its device), before resized on "
          f"the CPU to {test_w} x {test_h} x 3; id map uint8 after (ids < 256), int32 before; "
          f"~{meta} B of routing columns per row; the driver gets one metadata row per part "
          f"(a shard's rows in a block) plus 8 B per ordinal after, every output row before. "
          "Measured: the summed `output_size_bytes` of each operator's blocks in Ray Data's "
          "stats, divided by the images.")

    base = [r for c, r in new if c["service_ms"] == 0]
    if base:
        print("\n## Capacity (for the README)\n")
        print("CPU-ms per image around the model = read + decode + encode/parts + commit + "
              "the predictor actor's host work (after: the actor encodes and writes the parts "
              "too; zero-cost stand-in runs; Ray system processes "
              "and the driver apart). Cores per GPU = that x rate / 1000; GPUs per driver = "
              "the rate at which the driver's fitted CPU (per image + per second, above) "
              "reaches one core / rate per GPU (before: 1000 / driver CPU-ms per image / rate)."
              "\n")
        print("| from run | CPU-ms/image around the model | driver CPU-ms/image | cores per "
              "GPU at 25 / 50 / 100 images/s | GPUs one driver feeds at 25 / 50 / 100 "
              "images/s per GPU |")
        print("|---|---|---|---|---|")
        rows = [(c, r) for c, r in new if c["service_ms"] == 0]
        if old0:
            rows.append(next((c, r) for c, r in old if r is old0))
        for c, r in rows:
            around, drv = _around_model_ms(r), _driver_ms(r)
            cores = " / ".join(f"{around * rate / 1000:.2f}" for rate in (25, 50, 100))
            if fit and c["code"] == "new":  # the fitted driver: per image + per second
                gpus = " / ".join(f"{driver_capacity(fit) / rate:.0f}" for rate in (25, 50, 100))
            else:
                gpus = " / ".join(f"{1000 / drv / rate:.0f}" if drv > 0 else "-"
                                  for rate in (25, 50, 100))
            print(f"| {c['label']} | {around:.2f} | {drv:.3f} | {cores} | {gpus} |")
        print(f"| before (issue) | {ISSUE['decode_ms'] + ISSUE['encode_ms']:.1f} (decode + "
              f"encode only) | {ISSUE['driver_ms']} | "
              + " / ".join(f"{(ISSUE['decode_ms'] + ISSUE['encode_ms']) * rate / 1000:.2f}"
                           for rate in (25, 50, 100))
              + " | " + " / ".join(f"{1000 / ISSUE['driver_ms'] / rate:.0f}"
                                   for rate in (25, 50, 100)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one run, as JSON
    parser.add_argument("--images", type=int, default=1000, help="images of the main runs")
    parser.add_argument("--big-images", type=int, default=5000,
                        help="images of the local memory run (0: skip it)")
    parser.add_argument("--shards", type=int, default=None,
                        help="shards of the main runs (overrides --images)")
    parser.add_argument("--per-shard", type=int, default=50, help="JPEGs per tar shard")
    parser.add_argument("--service-ms", default="0,20",
                        help="stand-in service times per image on the local node, comma list")
    parser.add_argument("--cluster-service-ms", default="0,40",
                        help="stand-in service times per image on the 3-node cluster")
    parser.add_argument("--cluster", choices=["local", "cluster", "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--old", default="/tmp/old" if os.path.isdir("/tmp/old/pipeline") else "",
                        help="a checkout of the code before (82bf6a7) to measure beside; '' "
                        "to skip")
    parser.add_argument("--timeout", type=float, default=360.0, help="seconds per run")
    parser.add_argument("--verbose", action="store_true", help="CPU by process title too")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    if args.run:
        print(MARK + json.dumps(run_one(json.loads(args.run))), flush=True)
        return

    shards = args.shards or max(1, args.images // args.per_shard)
    big = max(1, args.big_images // args.per_shard) if args.big_images else 0
    work = tempfile.mkdtemp(prefix="panoray-scale-")
    try:
        counts = {"warm": 1, "main": shards}
        if big:
            counts["big"] = big
        folders, jpeg_bytes = make_sources(work, counts, args.per_shard)
        print(f"data: {shards} shards x {args.per_shard} JPEGs {WIDTH} x {HEIGHT} "
              f"({jpeg_bytes / 1000:.1f} kB each){f', and {big} shards' if big else ''} in "
              f"{work}; {os.cpu_count()} CPUs here", file=sys.stderr)
        plan = []

        def add(label, *, code="new", mode="local", ms=0.0, src="main"):
            plan.append({"label": label, "code": code, "mode": mode, "service_ms": ms,
                         "src": folders[src], "warmup_src": folders["warm"],
                         "images": counts[src] * args.per_shard, "batch_size": args.batch_size,
                         "tree": args.old if code == "old" else ROOT})

        local_ms = [float(x) for x in args.service_ms.split(",") if x.strip()]
        cluster_ms = [float(x) for x in args.cluster_service_ms.split(",") if x.strip()]
        if args.cluster in ("local", "both"):
            for ms in local_ms:
                add(f"local {ms:g} ms", ms=ms)
            if big:
                add(f"local 0 ms, {big * args.per_shard} images", src="big")
            if args.old:
                add("before (82bf6a7) local 0 ms", code="old")
        if args.cluster in ("cluster", "both"):
            for ms in cluster_ms:
                add(f"cluster {ms:g} ms", mode="cluster", ms=ms)
        runs = []
        for cfg in plan:
            cfg["work"] = os.path.join(work, "run-" + str(len(runs)) + "-" +
                                       cfg["label"].replace(" ", "_").replace(",", ""))
            os.makedirs(cfg["work"], exist_ok=True)
            result = launch(cfg, timeout=args.timeout)
            if result is not None:
                runs.append((cfg, result))
                shutil.rmtree(cfg["work"], ignore_errors=True)
        if runs:
            print_tables(runs, jpeg_bytes, args.per_shard)
        if args.verbose:
            for cfg, r in runs:
                top = sorted(r["titles"].items(), key=lambda kv: -kv[1])[:12]
                print(f"\n{cfg['label']}: CPU s by process title: " + "; ".join(
                    f"{t} {s:.2f}" for t, s in top))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
