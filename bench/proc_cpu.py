"""Where a benchmark's CPU goes, process by process, over a window of its run.

`ProcessCPU` samples, every `interval` seconds, the CPU seconds, resident memory and command
line of this process, all its descendants (Ray's processes) and any extra process handed to it
(an S3 server). `by_role(t0, t1)` then gives the CPU seconds each role used between two
wall-clock times (linear between samples): a role named by the caller, else one read from the
process's latest command line (raylet, GCS, ``Ray worker: Committer``...); `peak_rss` is the
peak of the summed resident memory. The sampling runs in a thread of this process, about 7
CPU-ms a sample with a local Ray: its own CPU is counted apart ("bench sampler"), not as this
process's, and it samples once a second.
Imported by the bench scripts beside it.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict

import psutil


def role_of(cmd: str) -> str:
    """A short name for what a process of a local Ray run does, from its command line (a Ray
    worker's is its title: ``ray::Committer``, ``ray::IDLE``...)."""
    program = cmd.split(" ", 1)[0]
    for key, role in (("raylet", "raylet"), ("gcs_server", "GCS")):
        if key in program:
            return role
    if cmd.startswith("ray::"):
        title = cmd[len("ray::"):].split(".", 1)[0].split("(", 1)[0].strip()
        return f"Ray worker: {title}"
    if "default_worker.py" in cmd:
        return "Ray worker: starting"
    return "Ray's other processes"


class ProcessCPU:
    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.named: dict[int, str] = {}  # pid -> role, for processes named by the caller
        self.extra: list[psutil.Process] = []
        self.peak_rss = 0
        self._cmds: dict[int, str] = {}  # pid -> its latest command line (titles change)
        self._times: list[float] = []
        self._samples: list[dict[int, float]] = []
        self._sampler_cpu = 0.0  # CPU seconds the sampling thread has used
        self._sampler: list[float] = []  # ... as of each sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, pid: int, role: str) -> None:
        """Count process `pid` (not a descendant of this one) as `role`."""
        self.named[pid] = role
        self.extra.append(psutil.Process(pid))

    def name(self, pid: int, role: str) -> None:
        """Count descendant `pid` as `role` (e.g. the predictor actor, once its pid is known)."""
        self.named[pid] = role

    def _sample(self) -> None:
        me = psutil.Process()
        cpu, rss = {}, 0
        for p in [me, *me.children(recursive=True), *self.extra]:
            try:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
                rss += p.memory_info().rss
            except psutil.Error:
                continue
            if p.pid == me.pid:
                self._cmds[p.pid] = "driver"
            elif p.pid not in self.named:
                try:
                    self._cmds[p.pid] = " ".join(p.cmdline())
                except psutil.Error:
                    self._cmds.setdefault(p.pid, "")
        self._times.append(time.time())
        self._samples.append(cpu)
        self._sampler.append(self._sampler_cpu)
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            t0 = time.thread_time()
            self._sample()
            self._sampler_cpu += time.thread_time() - t0
            self._sampler[-1] = self._sampler_cpu

    def _at(self, pid: int | None, t: float) -> float:
        """CPU seconds of `pid` (None: the sampling thread) at time `t` (0 before it was first
        seen, its last sample after it was last seen)."""
        if pid is None:
            seen = list(zip(self._times, self._sampler))
        else:
            seen = [(tt, s[pid]) for tt, s in zip(self._times, self._samples) if pid in s]
        if not seen or t <= seen[0][0]:
            return 0.0 if not seen or t < seen[0][0] else seen[0][1]
        i = bisect.bisect_left([tt for tt, _ in seen], t)
        if i >= len(seen):
            return seen[-1][1]
        (ta, ca), (tb, cb) = seen[i - 1], seen[i]
        return ca + (cb - ca) * (t - ta) / (tb - ta)

    def by_role(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role between wall-clock times t0 and t1."""
        out: dict[str, float] = defaultdict(float)
        for pid in {pid for sample in self._samples for pid in sample}:
            if pid in self.named:
                role = self.named[pid]
            elif self._cmds.get(pid) == "driver":
                role = "driver"
            else:
                role = role_of(self._cmds.get(pid, ""))
            out[role] += self._at(pid, t1) - self._at(pid, t0)
        sampler = self._at(None, t1) - self._at(None, t0)
        out["driver"] -= sampler
        out["bench sampler (in the driver)"] = sampler
        return dict(out)

    def __enter__(self) -> ProcessCPU:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
