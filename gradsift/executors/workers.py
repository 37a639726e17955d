"""The workers ``executors.ray.run_on_pool`` runs: one plain class per kind of work, no Ray in them.

A worker is built once per actor from configs and paths (``__init__``), then called once per item
(``__call__``). It reads its inputs from the run's staging folder, writes its own Parquet parts there
(atomically, under deterministic names: a retried item rewrites the same part) and returns small
metadata. The compute modules are imported inside the worker, so that the driver imports no torch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.parquet as pq

from gradsift.schemas.config import AnalyzeConfig, ModelConfig
from gradsift.schemas.engine import EngineConfig
from gradsift.schemas.tables import SCORE_TABLES
from gradsift.storage.feature_rows import write_rows
from gradsift.storage.store import Store

UNSCORED = "unscored"
"""Scratch table of a run's staging: a shard's samples that still need scores (``flows.incremental.unscored_shards``
writes it for a shard whose other samples the lake has scored); the scoring worker reads it instead of the shard."""


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux ``ru_maxrss``, KiB), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ScoringWorker:
    """Holds one model; scores shards of one run into that run's staging folder."""

    def __init__(
        self,
        store_root: str,
        run_id: str,
        model: ModelConfig,
        engine: EngineConfig,
        label_index,
        seed: int,
        feature_rows: bool,
    ):
        """``feature_rows``: also write each features part's raw rows (``storage.feature_rows``), for an influence
        stage that streams them."""
        from gradsift.signals.scoring import ShardScorer

        self.staging = Store(store_root).staging(run_id)
        self.scorer = ShardScorer(model, engine, label_index, seed)
        self.feature_rows = feature_rows
        self.reported = False

    def __call__(self, shard: str) -> dict:
        """Score one shard (its ``UNSCORED`` samples where the stage wrote them); the first result of each actor also
        says which parameters the gradients cover."""
        start = time.perf_counter()
        part = self.staging.scratch.part_path(UNSCORED, shard)
        samples = pq.read_table(part if part.exists() else self.staging.part_path("samples", shard))
        tables = self.scorer.score(samples)
        for name in (t for t in SCORE_TABLES if t in tables):
            self.staging.write_part(name, shard, tables[name])
        if self.feature_rows and "features" in tables:
            write_rows(self.staging.dir, shard, tables["features"])
        info = {"shard": shard, "rows": tables["scores"].num_rows, "seconds": time.perf_counter() - start}
        info |= {"pid": os.getpid(), "parameter_set": None if self.reported else self.scorer.parameter_set()}
        self.reported = True
        return info


class CheckpointFeatures:
    """Features ("grad" and LESS "adam") of shards at training checkpoints, into one run's staging folder."""

    def __init__(self, store_root: str, run_id: str, feature_dim: int, seed: int):
        self.staging = Store(store_root).staging(run_id)
        self.feature_dim, self.seed = feature_dim, seed

    def __call__(self, item: tuple) -> dict:
        """``item``: (CheckpointInfo, shards). Loads that checkpoint once and featurises every shard that has
        no part yet (a retry after a crash skips the finished ones); returns the rows featurised."""
        import pyarrow as pa

        from gradsift.signals.influence import CheckpointFeaturizer, checkpoint_name

        info, shards = item
        from gradsift.storage.keys import FeaturePart

        name = checkpoint_name(info)
        todo = [s for s in shards if not self.staging.has_part("features", FeaturePart(s, name).name)]
        featurizer = CheckpointFeaturizer(info, self.feature_dim, self.seed) if todo else None
        rows = 0
        for shard in todo:
            samples = pq.read_table(self.staging.part_path("samples", shard))
            tables = featurizer.featurize(samples)
            part, table = FeaturePart(shard, name).name, pa.concat_tables(tables.values())
            self.staging.write_part("features", part, table)
            write_rows(self.staging.dir, part, table)  # the influence stage streams them
            rows += samples.num_rows
        return {"checkpoint": name, "rows": rows}


class InfluenceBlocks:
    """Influence of blocks of training shards on the target shards (numpy only), all in one staging folder."""

    def __init__(self, staging_dir: str, target_shards: list[str], sources: list, datasets: list[str], methods, top_k):
        from gradsift.signals.influence import read_targets

        self.staging_dir, self.sources, self.methods, self.top_k = Path(staging_dir), sources, methods, top_k
        self.targets = read_targets(self.staging_dir, target_shards, sources, datasets)[0]

    def __call__(self, item: tuple[int, list[str], list[str]]) -> dict:
        """``item``: (block index, shards, shards to read ahead; ``signals.influence.block_items``) ->
        ``signals.influence.score_block``'s result, the block index, its seconds, this process's id and peak memory."""
        from gradsift.signals.influence import score_block

        start = time.perf_counter()
        index, shards, ahead = item
        res = score_block(self.staging_dir, shards, self.sources, self.targets, self.methods, self.top_k, ahead)
        info = {
            "block": index,
            "seconds": time.perf_counter() - start,
            "pid": os.getpid(),
            "peak_rss_mb": peak_rss_mb(),
        }
        return res | info


def analysis_engine(config: AnalyzeConfig, **overrides):
    """The analysis model (all parameters, layer stats) on this worker's device, and its tokenizer."""
    from gradsift.engine.gradients import PerSampleGradients
    from gradsift.models.loading import load_model
    from gradsift.signals.scoring import pick_device

    model, tokenizer = load_model(config.model.name_or_path, seed=config.seed)
    model.to(pick_device())
    base = config.score.engine.model_dump() | {"parameters": "all", "layer_stats": True}
    return PerSampleGradients(model, EngineConfig(**(base | overrides))), tokenizer


class PairEntanglement:
    """Entanglement of chunks of preference pairs, written as ``pair_scores`` parts of one run."""

    def __init__(self, config: AnalyzeConfig, dataset: str, store_root: str, run_id: str):
        self.config, self.dataset = config, dataset
        self.staging = Store(store_root).staging(run_id)
        micro = config.score.engine.micro_batch_size
        self.engine, self.tokenizer = analysis_engine(config, loss_reduction="sum", micro_batch_size=micro)

    def __call__(self, item: tuple[int, list[tuple[int, str, str, str]]]) -> dict:
        """``item``: (chunk index, rows of (line, prompt, chosen, rejected)) -> part ``chunk-<index>``; returns
        its row and truncation counts and the quarantine rows of pairs without response tokens."""
        from gradsift.signals.entanglement import score_pairs

        index, rows = item
        cfg = self.config
        table, bad = score_pairs(
            self.engine, self.tokenizer, rows, self.dataset, cfg.data, cfg.model.max_tokens, cfg.pairs.exact
        )
        self.staging.write_part("pair_scores", f"chunk-{index:05d}", table)
        return {"rows": table.num_rows, "truncated": sum(table.column("truncated").to_pylist()), "bad": bad}


class VariantCurves:
    """Nuclear-norm layer curves of response variants (fast vs slow thinking)."""

    def __init__(self, config: AnalyzeConfig):
        self.config = config
        self.engine, self.tokenizer = analysis_engine(config, nuclear_modules=config.fast_slow.modules, feature_dim=0)

    def __call__(self, item: tuple[str, list[tuple[str, str]]]) -> dict:
        """``item``: (variant, (prompt, response) pairs) -> {"variant", "curve"} (``signals.layer_curves``)."""
        from gradsift.signals.layer_curves import nuclear_curves

        variant, pairs = item
        return {
            "variant": variant,
            "curve": nuclear_curves(self.engine, self.tokenizer, pairs, self.config.model.max_tokens),
        }
