"""Ray execution of the scoring work: a pool of actors, each loading the model once.

Executors know nothing about the steps: actors get configs and paths (never live models or
clients), read their shard's samples from the run's staging folder, write their own Parquet parts
there, and return only small metadata. A worker that dies costs a restart and a retry of its
shard; parts are deterministic and written atomically, so a retried shard is scored exactly once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow.parquet as pq
import ray

from gradsift.schemas.config import ModelConfig, RayConfig
from gradsift.schemas.engine import EngineConfig
from gradsift.storage.store import Store

SCORE_TABLES = ("features", "layer_stats", "scores")  # write order: a shard is done once its scores part exists


def ensure_ray(config: RayConfig) -> str:
    """Join the configured cluster, or start a local Ray sized to the machine; returns a description.

    A cluster's workers get the driver's PREFECT_, HF_ and TRANSFORMERS_ settings through the job's
    runtime_env. A local Ray's workers inherit the driver's environment, so it starts without one, and
    without the dashboard unless ``config.dashboard``. Ray 2.60 then still starts its dashboard head with
    the usage-stats module only (which probes the cloud metadata addresses once, usage stats on or off),
    and the raylet's dashboard and runtime-env agents: no ray.init option turns those off.
    """
    if not ray.is_initialized():
        if config.address:
            env = {k: v for k, v in os.environ.items() if k.startswith(("PREFECT_", "HF_", "TRANSFORMERS_"))}
            ray.init(address=config.address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(include_dashboard=config.dashboard, log_to_driver=False, configure_logging=False)
    where = config.address or "local"
    return f"{where} ({int(ray.cluster_resources().get('CPU', 0))} CPUs, {int(ray.cluster_resources().get('GPU', 0))} GPUs)"


@ray.remote
class ScoringActor:
    """Holds one model; scores shards of one run into that run's staging folder."""

    def __init__(self, store_root: str, run_id: str, model: dict, engine: dict, label_index, seed: int):
        from gradsift.signals.scoring import ShardScorer

        self.staging = Store(store_root).staging(run_id)
        self.scorer = ShardScorer(ModelConfig(**model), EngineConfig(**engine), label_index, seed)

    def parameter_set(self) -> dict:
        return self.scorer.parameter_set()

    def score_shard(self, shard: str) -> dict:
        start = time.perf_counter()
        samples = pq.read_table(self.staging.part_path("samples", shard))
        tables = self.scorer.score(samples)
        for name in (t for t in SCORE_TABLES if t in tables):
            self.staging.write_part(name, shard, tables[name])
        return {
            "shard": shard,
            "rows": tables["scores"].num_rows,
            "seconds": time.perf_counter() - start,
            "pid": os.getpid(),
        }


@dataclass
class PoolResult:
    shards_scored: int
    shards_skipped: int
    rows: int
    seconds: float
    parameter_set: dict | None


def score_shards(
    store: Store,
    run_id: str,
    shards: Sequence[str],
    model: ModelConfig,
    engine: EngineConfig,
    ray_config: RayConfig,
    label_index: dict[str, int] | None = None,
    seed: int = 0,
    on_shard_done: Callable[[dict, int, int], None] | None = None,
) -> PoolResult:
    """Score every shard that has no scores part yet, on a pool of actors fed one shard at a time."""
    staging = store.staging(run_id)
    todo = [s for s in shards if not staging.has_part("scores", s)]
    skipped = len(shards) - len(todo)
    start = time.perf_counter()
    if not todo:
        return PoolResult(0, skipped, 0, 0.0, None)
    ensure_ray(ray_config)
    n_actors = min(ray_config.num_actors, len(todo))
    actors = [
        ScoringActor.options(
            num_cpus=ray_config.num_cpus_per_actor,
            num_gpus=ray_config.num_gpus_per_actor,
            max_restarts=ray_config.max_restarts,
            max_task_retries=ray_config.max_task_retries,
        ).remote(str(store.root), run_id, model.model_dump(), engine.model_dump(), label_index, seed)
        for _ in range(n_actors)
    ]
    try:  # release the actors explicitly on failure too, rather than relying on handle collection
        parameter_set = ray.get(actors[0].parameter_set.remote())
        queue = list(todo)
        running: dict[ray.ObjectRef, ray.actor.ActorHandle] = {}
        for actor in actors:
            if queue:
                running[actor.score_shard.remote(queue.pop(0))] = actor
        rows = done = 0
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready[0])
            info = ray.get(ready[0])
            rows += info["rows"]
            done += 1
            if on_shard_done:
                on_shard_done(info, done, len(todo))
            if queue:
                running[actor.score_shard.remote(queue.pop(0))] = actor
    finally:
        for actor in actors:
            ray.kill(actor)
    return PoolResult(done, skipped, rows, time.perf_counter() - start, parameter_set)


def run_jobs(fn: Callable, jobs: list[tuple], ray_config: RayConfig) -> list:
    """``fn(*job)`` for each job: in process for one job, else as Ray tasks of one CPU each."""
    if len(jobs) == 1:
        return [fn(*jobs[0])]
    ensure_ray(ray_config)
    remote = ray.remote(num_cpus=1, max_retries=1)(fn)
    return ray.get([remote.remote(*job) for job in jobs])
