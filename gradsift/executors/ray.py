"""The one Ray executor: start or join Ray, and run items on a pool of actors.

It knows nothing about the steps. A worker is a plain class, ``worker_cls(*init_args)`` then
``worker(item) -> small result`` per item, defined with the step it runs (``executors.workers``); it gets
configs and paths, never live models or clients, writes its own Parquet parts and returns small metadata.
Each actor builds its worker once (a model is loaded once per actor, not per item). A worker that dies
mid-item costs a restart of its actor and a retry of that item (``max_restarts``, ``max_task_retries``):
a worker's parts are deterministic and written atomically, so a retried item is done exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gradsift.schemas.config import RayConfig


def ensure_ray(config: RayConfig) -> str:
    """Join the configured cluster, or start a local Ray sized to the machine; returns a description.

    A cluster's workers get the driver's PREFECT_, HF_ and TRANSFORMERS_ settings through the job's
    runtime_env. A local Ray's workers inherit the driver's environment, so it starts without one, and
    without the dashboard unless ``config.dashboard``. Ray 2.60 then still starts its dashboard head with
    the usage-stats module only (which probes the cloud metadata addresses once, usage stats on or off),
    and the raylet's dashboard and runtime-env agents: no ray.init option turns those off.
    """
    import ray

    if not ray.is_initialized():
        if config.address:
            env = {k: v for k, v in os.environ.items() if k.startswith(("PREFECT_", "HF_", "TRANSFORMERS_"))}
            ray.init(address=config.address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(include_dashboard=config.dashboard, log_to_driver=False, configure_logging=False)
    where = config.address or "local"
    return f"{where} ({int(ray.cluster_resources().get('CPU', 0))} CPUs, {int(ray.cluster_resources().get('GPU', 0))} GPUs)"


def actor_options(config: RayConfig) -> dict[str, Any]:
    """What every pool actor declares and how it survives its worker dying."""
    return {
        "num_cpus": config.num_cpus_per_actor,
        "num_gpus": config.num_gpus_per_actor,
        "max_restarts": config.max_restarts,
        "max_task_retries": config.max_task_retries,
    }


def run_on_pool(
    worker_cls: type,
    init_args: Sequence,
    items: Sequence,
    config: RayConfig,
    on_done: Callable[[Any, int, int], None] | None = None,
    small_in_process: bool = False,
    threads: int = 0,
) -> list:
    """``worker(item)`` for every item on ``min(config.num_actors, len(items))`` actors; the results in the
    order they finished (a worker that needs its item's place returns it). With ``small_in_process``, a small
    input without a cluster (``in_process``) runs on one worker built in this process instead, item by item
    (same parts written, same results). With ``threads`` > 0, without a cluster, one worker built in this process
    runs the items on that many threads, each item to the next free thread: for a thread-safe worker whose work
    releases the GIL (numpy), which then pays no Ray or actor start and no import per actor.

    Items go to whichever actor is free (``ray.util.ActorPool``); ``init_args`` are small (configs and paths,
    sent inline: an actor restarts from them); ``on_done(result, n_done, n_items)`` follows each result.
    The actors are killed at the end, on failure too. An actor's process title names the worker:
    ``ray::<worker class>.__call__``.
    """
    if not items:
        return []
    if local := local_threads(config, len(items), small_in_process, threads):
        return _run_here(worker_cls(*init_args), items, local, on_done)
    import ray
    from ray.util import ActorPool

    ensure_ray(config)
    actor_cls = ray.remote(worker_cls).options(**actor_options(config))
    actors = [actor_cls.remote(*init_args) for _ in range(pool_workers(config, len(items)))]
    try:
        results = []
        for result in ActorPool(actors).map_unordered(lambda actor, item: actor.__call__.remote(item), list(items)):
            results.append(result)
            if on_done:
                on_done(result, len(results), len(items))
        return results
    finally:
        for actor in actors:
            ray.kill(actor)


def local_threads(config: RayConfig, n_items: int, small_in_process: bool = False, threads: int = 0) -> int:
    """Threads of this process ``run_on_pool`` runs ``n_items`` on with these options; 0: on Ray actors."""
    if threads > 0 and not config.address:
        return min(threads, n_items)
    return 1 if small_in_process and in_process(config, n_items) else 0


def pool_workers(config: RayConfig, n_items: int, small_in_process: bool = False, threads: int = 0) -> int:
    """How many workers (threads here or Ray actors) ``run_on_pool`` runs ``n_items`` on with these options."""
    return local_threads(config, n_items, small_in_process, threads) or min(config.num_actors, n_items)


def _run_here(worker: Callable, items: Sequence, threads: int, on_done: Callable[[Any, int, int], None] | None) -> list:
    """``worker(item)`` for every item in this process: in this thread, or on a pool of ``threads`` threads."""
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    results: list = []
    try:
        for result in pool.map(worker, items) if pool else map(worker, items):
            results.append(result)
            if on_done:
                on_done(result, len(results), len(items))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return results


def in_process(config: RayConfig, n_items: int) -> bool:
    """Whether ``n_items`` of work run in this process rather than on a freshly started local Ray: no cluster
    is configured and there are at most ``config.in_process_max_shards`` (starting Ray and its actors costs more
    than such an input takes)."""
    return not config.address and n_items <= config.in_process_max_shards


def describe_executor(config: RayConfig, n_items: int) -> str:
    """Where ``run_on_pool(..., small_in_process=True)`` runs ``n_items``, for the progress log (starts nothing:
    ``run_on_pool`` starts or joins Ray where it uses it)."""
    if in_process(config, n_items):
        return f"in this process ({n_items} <= in_process_max_shards={config.in_process_max_shards}, no Ray cluster)"
    ray_at = f"the Ray cluster at {config.address}" if config.address else "a local Ray"
    return f"on {ray_at} with {min(config.num_actors, n_items)} actors"


class Jobs:
    """A worker that calls ``fn(*args)`` for each (index, args) item and returns (index, result)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, job: tuple[int, tuple]) -> tuple[int, Any]:
        index, args = job
        return index, self.fn(*args)


def run_jobs(fn: Callable, jobs: Sequence[tuple], config: RayConfig) -> list:
    """``fn(*job)`` for each job, results in job order: in this process for one job (no Ray to start, its
    progress lines on this console), else each job an item of ``run_on_pool``."""
    if len(jobs) == 1:
        return [fn(*jobs[0])]
    done = run_on_pool(Jobs, (fn,), list(enumerate(jobs)), config)
    return [result for _, result in sorted(done, key=lambda r: r[0])]
