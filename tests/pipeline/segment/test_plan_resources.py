"""Sizing of the predictor pool from what the cluster has (Ray's resource totals stubbed)."""

from __future__ import annotations

import pytest

from pipeline.segment import job


def plan(monkeypatch, cluster: dict, **asked):
    monkeypatch.setattr(job.ray, "cluster_resources", lambda: dict(cluster))
    kwargs = {"num_actors": None, "gpus_per_actor": None, "cpus_per_actor": 1.0,
              "threads_per_actor": None, **asked}
    return job.plan_resources(**kwargs)


def test_one_actor_per_gpu_each_reserving_a_cpu_where_there_are_plenty(monkeypatch):
    res = plan(monkeypatch, {"CPU": 96, "GPU": 8})
    assert (res.num_actors, res.gpus_per_actor, res.cpus_per_actor) == (8, 1.0, 1.0)


def test_gpu_actors_leave_cpu_for_reading_where_cpus_are_few(monkeypatch):
    # 2 GPUs, 2 CPUs: two actors of a CPU each would leave the read tasks nothing (a hang)
    res = plan(monkeypatch, {"CPU": 2, "GPU": 2})
    assert res.num_actors == 2
    assert res.num_actors * res.cpus_per_actor <= 1.0
    res = plan(monkeypatch, {"CPU": 1, "GPU": 1})
    assert res.num_actors * res.cpus_per_actor <= 0.5


def test_a_cpu_only_cluster_runs_one_single_threaded_actor_per_cpu(monkeypatch):
    # each actor reads its own shards (the read stage is fused into it): no CPU is kept back
    monkeypatch.setattr(job.os, "cpu_count", lambda: 2)
    res = plan(monkeypatch, {"CPU": 2})
    assert (res.num_actors, res.gpus_per_actor, res.threads_per_actor) == (2, 0.0, 1)
    res = plan(monkeypatch, {"CPU": 2}, num_actors=1)
    assert (res.num_actors, res.threads_per_actor) == (1, 2)
    res = plan(monkeypatch, {"CPU": 2}, cpus_per_actor=0.5)
    assert res.num_actors == 4
    with pytest.raises(ValueError, match="use at most 2 actors"):
        plan(monkeypatch, {"CPU": 2}, num_actors=3)


def test_asking_for_gpus_a_cluster_lacks_is_one_sentence(monkeypatch):
    with pytest.raises(ValueError, match="the cluster has 0"):
        plan(monkeypatch, {"CPU": 4}, gpus_per_actor=1.0)
    with pytest.raises(ValueError, match="use at most 2 actors"):
        plan(monkeypatch, {"CPU": 16, "GPU": 2}, num_actors=3)
