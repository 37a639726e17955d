"""The one Ray executor (gradsift.executors.ray) with trivial workers, on the session's local Ray (2 CPUs)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray.cloudpickle

from gradsift.executors.ray import run_jobs, run_on_pool
from gradsift.schemas.config import RayConfig

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers' processes cannot import tests/


class Squares:
    """Squares numbers, after ``pause`` seconds; dies once on ``die_on`` (a marker file says it did)."""

    def __init__(self, offset: int, pause: float = 0.0, die_on: int | None = None, marker: str = ""):
        self.offset, self.pause, self.die_on, self.marker = offset, pause, die_on, marker

    def __call__(self, x: int) -> dict:
        import psutil
        import ray

        if x == self.die_on and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)  # the actor's process dies mid-item
        time.sleep(self.pause)
        return {
            "x": x,
            "y": x * x + self.offset,
            "pid": os.getpid(),
            "title": " ".join(psutil.Process().cmdline()),
            "resources": ray.get_runtime_context().get_assigned_resources(),
        }


def _free_cpus_back(total: float, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= total:
            return True
        time.sleep(0.2)
    return False


def test_every_item_once_on_a_pool_of_actors_then_released(ray_local):
    total = ray.cluster_resources()["CPU"]
    config = RayConfig(address=None, num_actors=4, num_cpus_per_actor=0.5)
    progress = []
    results = run_on_pool(Squares, (1, 0.5), list(range(8)), config, lambda r, n, of: progress.append((r["x"], n, of)))
    assert sorted(r["x"] for r in results) == list(range(8)) and all(r["y"] == r["x"] ** 2 + 1 for r in results)
    assert [n for _, n, _ in progress] == list(range(1, 9)) and {of for _, _, of in progress} == {8}
    assert [x for x, _, _ in progress] == [r["x"] for r in results]  # results in the order they finished
    assert len({r["pid"] for r in results}) == 4  # 4 actors of half a CPU each fit on the 2 CPUs at once
    assert all(r["resources"] == {"CPU": 0.5} for r in results)
    assert all("ray::Squares.__call__" in r["title"] for r in results)  # a recognisable process title
    assert _free_cpus_back(total)  # the actors were killed


def test_fewer_items_than_actors_and_no_items(ray_local):
    results = run_on_pool(Squares, (0,), [3], RayConfig(address=None, num_actors=4))
    assert [r["y"] for r in results] == [9] and results[0]["resources"] == {"CPU": 1.0}
    assert run_on_pool(Squares, (0,), [], RayConfig(address=None)) == []


def test_actors_declare_the_configured_cpus_gpus_and_retries(ray_local, monkeypatch):
    """Each pool actor is created with the RayConfig's options (GPUs asked for here are then dropped, as the
    test's Ray has none, so that the pool runs)."""
    asked: list[dict] = []
    real_remote = ray.remote

    class Spy:
        def __init__(self, cls):
            self.cls = cls

        def options(self, **kw):
            asked.append(kw)
            return real_remote(self.cls).options(**(kw | {"num_gpus": 0}))

    monkeypatch.setattr(ray, "remote", Spy)  # the executor imports ray where it starts actors
    config = RayConfig(
        address=None, num_actors=2, num_cpus_per_actor=0.25, num_gpus_per_actor=0.5, max_restarts=3, max_task_retries=4
    )
    results = run_on_pool(Squares, (0,), [1, 2], config)
    assert asked == [{"num_cpus": 0.25, "num_gpus": 0.5, "max_restarts": 3, "max_task_retries": 4}]
    assert sorted(r["y"] for r in results) == [1, 4] and all(r["resources"] == {"CPU": 0.25} for r in results)


def test_a_worker_killed_mid_item_costs_a_restart_and_a_retry(ray_local, tmp_path):
    marker = tmp_path / "died"
    config = RayConfig(address=None, num_actors=2, max_restarts=1, max_task_retries=1)
    results = run_on_pool(Squares, (0, 0.2, 5, str(marker)), list(range(10)), config)
    assert marker.exists()  # item 5 killed its worker once
    assert sorted(r["x"] for r in results) == list(range(10))  # and was retried: every item done exactly once
    assert len({r["pid"] for r in results}) == 3  # two actors, one of them restarted in a new process


@pytest.mark.parametrize("jobs", [[(2, 3)], [(2, 3), (3, 2), (4, 1)]])
def test_run_jobs_keeps_the_jobs_order(ray_local, jobs):
    """One job runs in this process; several are items of the pool (results still in job order)."""
    assert run_jobs(pow, jobs, RayConfig(address=None, num_actors=2)) == [a**b for a, b in jobs]
