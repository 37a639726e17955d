"""Ray execution of influence: checkpoint featurisers (actors) and streamed score blocks (tasks).

As in ``tasks.pool``: workers get paths and configs, read their shards from the run's staging folder,
write their own Parquet parts and return small results (per-sample scores, top-k indices, domain
sums), never feature matrices. The target matrix is put in the object store once and shared.
Memory per block task: block_rows * (k * 2 bytes * sources + M * 4 bytes) plus one float32 copy of
one source's block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from gradsift.executors.ray_pool import ensure_ray
from gradsift.models.checkpoints import CheckpointInfo
from gradsift.schemas.config import RayConfig
from gradsift.schemas.influence import Method
from gradsift.signals.influence import (
    FeatureSource,
    Targets,
    block_scores,
    checkpoint_name,
    merge_top_k,
    read_block,
)
from gradsift.signals.mixture import DomainSums
from gradsift.storage.keys import FeaturePart
from gradsift.storage.store import Store


@ray.remote
class FeaturizeActor:
    """Holds one checkpoint's model and optimizer moments; featurises shards into staging."""

    def __init__(self, store_root: str, run_id: str, info: CheckpointInfo, feature_dim: int, seed: int):
        from gradsift.signals.influence import CheckpointFeaturizer

        self.staging = Store(store_root).staging(run_id)
        self.featurizer = CheckpointFeaturizer(info, feature_dim, seed)
        self.checkpoint = checkpoint_name(info)

    def featurize(self, shard: str) -> int:
        import pyarrow as pa

        samples = pq.read_table(self.staging.part_path("samples", shard))
        tables = self.featurizer.featurize(samples)
        part = FeaturePart(shard, self.checkpoint).name
        self.staging.write_part("features", part, pa.concat_tables(tables.values()))
        return samples.num_rows


def featurize_checkpoints(
    store: Store,
    run_id: str,
    shards: Sequence[str],
    checkpoints: list[CheckpointInfo],
    feature_dim: int,
    seed: int,
    ray_config: RayConfig,
) -> int:
    """Features ("grad" and LESS "adam") of every shard at every checkpoint; resumes finished parts.

    One actor per checkpoint at a time (``ray_config.num_actors`` checkpoints in parallel); returns rows done."""
    staging = store.staging(run_id)
    ensure_ray(ray_config)
    rows = 0
    for i in range(0, len(checkpoints), ray_config.num_actors):
        running = {}
        for info in checkpoints[i : i + ray_config.num_actors]:
            todo = [s for s in shards if not staging.has_part("features", FeaturePart(s, checkpoint_name(info)).name)]
            if not todo:
                continue
            actor = FeaturizeActor.options(
                num_cpus=ray_config.num_cpus_per_actor,
                num_gpus=ray_config.num_gpus_per_actor,
                max_restarts=ray_config.max_restarts,
                max_task_retries=ray_config.max_task_retries,
            ).remote(str(store.root), run_id, info, feature_dim, seed)
            running[actor] = [actor.featurize.remote(s) for s in todo]
        for actor, refs in running.items():
            rows += sum(ray.get(refs))
            ray.kill(actor)
    return rows


@ray.remote
def _score_block(
    staging_dir: str, shards: list[str], sources: list[FeatureSource], targets: Targets, methods: list, top_k: int
) -> dict:
    keys, feats = read_block(Path(staging_dir), shards, sources)
    res = block_scores(feats, targets, methods, top_k)
    groups = np.asarray(keys["domain"], dtype=object).astype(str)
    sums = [DomainSums().add(f, groups) for f in feats["grad"]]
    return {"keys": keys, "scores": res.scores, "top_rows": res.top_rows, "top_vals": res.top_vals, "sums": sums}


@dataclass
class InfluenceResult:
    """Scores of every training sample and what the mixture and report need."""

    keys: dict[str, list]
    scores: dict[str, np.ndarray]
    top_k: dict[str, tuple[np.ndarray, np.ndarray]]  # method -> (global row ids [k, M], values [k, M])
    domain_sums: list[DomainSums]  # per source (checkpoint), plain gradients
    seconds: float = 0.0
    blocks: int = 0


def group_shards(shards: Sequence[str], rows: dict[str, int], block_rows: int) -> list[list[str]]:
    """Consecutive shards packed into blocks of at most ``block_rows`` rows (a bigger shard is its own block)."""
    blocks, cur, n = [], [], 0
    for s in shards:
        if cur and n + rows[s] > block_rows:
            blocks.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += rows[s]
    return blocks + ([cur] if cur else [])


def stream_influence(
    staging_dir: Path,
    blocks: list[list[str]],
    sources: list[FeatureSource],
    targets: Targets,
    methods: list[Method],
    top_k: int,
    on_block: Callable[[int, int], None] | None = None,
) -> InfluenceResult:
    """Fan score blocks out as Ray tasks (at most 2 per CPU in flight) and merge their small results."""
    start = time.perf_counter()
    target_ref = ray.put(targets)
    window = max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = list(enumerate(blocks))
    running: dict = {}
    results: dict[int, dict] = {}
    while pending or running:
        while pending and len(running) < window:
            i, b = pending.pop(0)
            running[_score_block.remote(str(staging_dir), b, sources, target_ref, methods, top_k)] = i
        ready, _ = ray.wait(list(running), num_returns=1)
        results[running.pop(ready[0])] = ray.get(ready[0])
        if on_block:
            on_block(len(results), len(blocks))
    ordered = [results[i] for i in range(len(blocks))]
    keys = {k: [v for r in ordered for v in r["keys"][k]] for k in ("dataset", "sample_id", "domain")}
    scores = {m: np.concatenate([r["scores"][m] for r in ordered]) for m in methods}
    top = {}
    if top_k:
        offsets = np.cumsum([0] + [len(r["keys"]["sample_id"]) for r in ordered])
        for m in methods:
            top[m] = merge_top_k(
                [(r["top_rows"][m] + off, r["top_vals"][m]) for r, off in zip(ordered, offsets, strict=False)], top_k
            )
    sums = [DomainSums() for _ in sources]
    for r in ordered:
        for acc, s in zip(sums, r["sums"], strict=True):
            acc.merge(s)
    return InfluenceResult(keys, scores, top, sums, time.perf_counter() - start, len(blocks))
