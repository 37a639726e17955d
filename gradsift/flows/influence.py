"""Downstream curation stages (influence -> select -> mixture -> report) and the influence flow.

Each stage is a coarse Prefect task with retries that drives Ray directly, is skipped cleanly when
its config section is absent, and is resumable through its staging marker. The nightly flow runs
them after scoring; ``influence_flow`` runs them on training checkpoints without a scoring pass.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from gradsift.executors.ray import pool_workers, run_on_pool
from gradsift.executors.workers import CheckpointFeatures, InfluenceBlocks
from gradsift.flows.pipeline import Stage, run_pipeline
from gradsift.flows.retry import retry_transient
from gradsift.models.checkpoints import list_checkpoints
from gradsift.report.html import write_report
from gradsift.schemas.config import NightlyConfig
from gradsift.schemas.stages import InfluenceOutput, ReportOutput, SelectionOutput, StageOutput
from gradsift.schemas.tables import INFLUENCE, INFLUENCE_TOPK, MIXTURES, features_schema
from gradsift.selection.subsets import keep_fraction, score_ranks, selection_table, weighted_sample
from gradsift.signals.influence import (
    FeatureSource,
    block_items,
    checkpoint_name,
    group_shards,
    merge_blocks,
    read_block,
)
from gradsift.signals.mixture import DomainSums, alignment, mixture_weights
from gradsift.storage.feature_rows import write_rows
from gradsift.storage.keys import FeaturePart, ShardKey
from gradsift.storage.store import SCORE_KEY, RunStaging, Store


def _stage_reused_features(store: Store, staging: RunStaging, shards: list[str], dim: int) -> None:
    """The features of samples the score stage did not score (scored by an earlier run under this run's scoring
    key: a reused shard, or the old samples of a partly scored one), read back from the lake into this run's
    staged part of their shard, in the shard's order, with their raw rows: the influence blocks read staged
    parts. Committing them again adds no rows (the lake keeps a key once)."""
    short = [
        s for s in shards
        if not staging.has_part("features", s) or staging.count_rows("features", s) < staging.count_rows("samples", s)
    ]  # fmt: skip
    if not short:
        return
    key = (staging.stage_info(SCORE_KEY) or {}).get("key")
    with store.reader() as con:
        for shard in short:
            ids = pq.read_table(staging.part_path("samples", shard), columns=["dataset", "sample_id"])
            path = staging.part_path("features", shard)
            staged = pq.read_table(path) if path.exists() else None
            need = ids if staged is None else ids.filter(pc.invert(pc.is_in(ids["sample_id"], staged["sample_id"])))
            con.register("_need", need)
            found = con.execute(
                "SELECT f.checkpoint, f.dataset, f.sample_id, f.feature FROM features f JOIN _need "
                "USING (dataset, sample_id) WHERE f.score_key = ?",
                [key],
            ).to_arrow_table()
            con.unregister("_need")
            values = pc.cast(found.column("feature").combine_chunks().flatten(), pa.float16())
            feature = pa.FixedSizeListArray.from_arrays(values, dim)
            table = pa.Table.from_arrays([*found.select(["checkpoint", "dataset", "sample_id"]).columns, feature],
                                         schema=features_schema(dim))  # fmt: skip
            if staged is not None:
                table = pa.concat_tables([staged.cast(table.schema), table])
            order = {sid: i for i, sid in enumerate(ids["sample_id"].to_pylist())}  # the blocks map rows uncopied
            table = table.take(np.argsort([order[sid] for sid in table["sample_id"].to_pylist()], kind="stable"))
            staging.write_part("features", shard, table)
            write_rows(staging.dir, shard, table)


def _sources(config: NightlyConfig, store: Store, staging: RunStaging, shards: list[str]) -> list[FeatureSource]:
    """Feature sources: each LoRA checkpoint (featurised here), or the score stage's features."""
    target = config.target
    if target.checkpoints is None:
        if config.score.engine.feature_dim == 0:
            raise ValueError("influence without checkpoints reads the score stage's features: set a feature_dim > 0")
        _stage_reused_features(store, staging, shards, config.score.engine.feature_dim)
        return [FeatureSource.final(config.model.checkpoint)]
    ck = target.checkpoints
    infos = list_checkpoints(ck.store or store.root, ck.train_run)
    if ck.steps is not None:
        infos = [c for c in infos if c.step in set(ck.steps)]
    if not infos:
        raise FileNotFoundError(f"no checkpoints of training run {ck.train_run!r} (steps {ck.steps})")
    todo = [(c, [s for s in shards if not staging.has_part("features", FeaturePart(s, checkpoint_name(c)).name)])
            for c in infos]  # fmt: skip
    worker = (str(store.root), staging.run_id, target.feature_dim, config.seed)
    run_on_pool(CheckpointFeatures, worker, [(c, s) for c, s in todo if s], config.ray)  # a checkpoint an item
    return [FeatureSource.at_checkpoint(checkpoint_name(info), info.lr) for info in infos]


@task(name="influence", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def influence_stage(
    config: NightlyConfig, store: Store, run_id: str, results: Mapping[str, StageOutput]
) -> InfluenceOutput:
    """Influence of every training sample on the target set (LESS / TracIn / cosine), streamed in blocks: in this
    process without a Ray cluster, on Ray actors with one."""
    logger = get_run_logger()
    if config.target is None:
        return InfluenceOutput(skipped="no target section")
    staging = store.staging(run_id)
    if (done := staging.stage_info("influence")) is not None:
        return InfluenceOutput.model_validate(done)
    target = config.target
    shards = results["ingest"].shards
    target_shards = [s for s in shards if ShardKey.parse(s).dataset in target.datasets]
    train_shards = [s for s in shards if ShardKey.parse(s).dataset not in target.datasets]
    sources = _sources(config, store, staging, shards)
    t_keys, t_feats = read_block(staging.dir, target_shards, sources)
    n_targets = len(t_keys["sample_id"])
    rows = {s: staging.count_rows("samples", s) for s in train_shards}
    blocks = group_shards(train_shards, rows, target.block_rows)
    logger.info(
        "influence of %d training samples on %d targets in %d blocks", sum(rows.values()), n_targets, len(blocks)
    )
    start = time.perf_counter()
    numpy_only = config.ray.model_copy(update={"num_gpus_per_actor": 0.0})  # block products need no GPU
    worker = (str(staging.dir), target_shards, sources, target.datasets, target.methods, target.top_k)  # paths
    # Without a cluster, in this process on one thread: numpy's BLAS already uses every core, a second block thread
    # oversubscribes it, and Ray's actors cost their start and imports (bench/RESULTS.md, influence fifth pass)
    items = block_items(blocks, pool_workers(numpy_only, len(blocks), threads=1))
    done = run_on_pool(InfluenceBlocks, worker, items, numpy_only, threads=1)
    res = merge_blocks(sorted(done, key=lambda r: r["block"]), target.methods, target.top_k, len(sources))
    seconds = time.perf_counter() - start
    n = len(res.keys["sample_id"])
    for method, scores in res.scores.items():
        part = {"target": [target.name] * n, "method": [method] * n, "dataset": res.keys["dataset"]}
        part |= {"sample_id": res.keys["sample_id"], "score": scores.tolist(), "rank": score_ranks(scores).tolist()}
        staging.write_part("influence", f"{target.name}-{method}", pa.Table.from_pydict(part, schema=INFLUENCE))
        if target.top_k:
            staging.write_part(
                "influence_topk", f"{target.name}-{method}", _topk_table(target.name, method, res, t_keys)
            )
    t_groups = np.asarray(["target"] * n_targets, dtype=object)
    aligned = [
        alignment(d, DomainSums().add(np.concatenate(t), t_groups))
        for d, t in zip(res.domain_sums, t_feats["grad"], strict=True)
    ]
    info = InfluenceOutput(
        rows=n * len(res.scores),
        targets=n_targets,
        checkpoints=[s.name for s in sources],
        blocks=res.blocks,
        seconds=round(seconds, 2),
        alignment=aligned,
        domain_counts=res.domain_sums[0].count,
    )
    staging.mark_done("influence", info.model_dump())
    return info


def _topk_table(name: str, method: str, res, t_keys: dict) -> pa.Table:
    rows_idx, vals = res.top_k[method]
    k, m = rows_idx.shape
    return pa.Table.from_pydict(
        {
            "target": [name] * (k * m),
            "method": [method] * (k * m),
            "target_dataset": [t_keys["dataset"][j] for j in range(m) for _ in range(k)],
            "target_sample_id": [t_keys["sample_id"][j] for j in range(m) for _ in range(k)],
            "rank": [r for _ in range(m) for r in range(k)],
            "dataset": [res.keys["dataset"][rows_idx[r, j]] for j in range(m) for r in range(k)],
            "sample_id": [res.keys["sample_id"][rows_idx[r, j]] for j in range(m) for r in range(k)],
            "score": [float(vals[r, j]) for j in range(m) for r in range(k)],
        },
        schema=INFLUENCE_TOPK,
    )


@task(name="select", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def select_stage(
    config: NightlyConfig, store: Store, run_id: str, results: Mapping[str, StageOutput]
) -> SelectionOutput:
    """The preset "top p% for target T": keep the training samples with the highest influence."""
    if config.target is None:
        return SelectionOutput(skipped="no target section")
    target = config.target
    method = target.select_method or target.methods[0]
    staging = store.staging(run_id)
    table = pq.read_table(staging.part_path("influence", f"{target.name}-{method}"))
    result = keep_fraction(
        table.column("sample_id").to_pylist(),
        table.column("score").to_numpy(),
        target.select_fraction,
        drop="low",
        seed=config.seed,
        name=f"{method} influence on {target.name}",
    )
    name = f"{target.name}-{method}-top{target.select_fraction:g}"
    staging.write_part("selections", name, selection_table(result, name, table.column("dataset").to_pylist()))
    return SelectionOutput(selection=name, kept=result.n_kept, rows=len(result.ids))


@task(name="mixture", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def mixture_stage(
    config: NightlyConfig, store: Store, run_id: str, results: Mapping[str, StageOutput]
) -> SelectionOutput:
    """Domain weights alpha ~ prior exp(eta sum_c a_{c,d}) (DGA / DoGE) and a budget sampled with them."""
    if config.mixture is None or config.target is None:
        return SelectionOutput(skipped="no mixture section")
    mix, infl = config.mixture, results["influence"]
    counts = infl.domain_counts
    prior = mix.prior or {d: float(n) for d, n in counts.items()}
    weights = mixture_weights(infl.alignment, {d: prior.get(d, 0.0) for d in counts}, mix.eta, mix.smoothing)
    total_prior = sum(prior.get(d, 0.0) for d in counts)
    staging = store.staging(run_id)
    rows = [
        {
            "domain": d,
            "weight": weights[d],
            "alignment": sum(a[d] for a in infl.alignment),
            "prior": prior.get(d, 0.0) / total_prior,
            "n_samples": counts[d],
        }
        for d in sorted(counts)
    ]
    staging.write_part("mixtures", "weights", pa.Table.from_pylist(rows, schema=MIXTURES))
    pool = pq.read_table(staging.part_path("influence", f"{config.target.name}-{config.target.methods[0]}"))
    samples = _domains(staging, results["ingest"].shards)
    ids = pool.column("sample_id").to_pylist()
    domains = [samples[i] for i in ids]
    budget = mix.budget or max(1, len(ids) // 10)
    result = weighted_sample(ids, domains, budget, weights, config.seed)
    name = f"{config.target.name}-mixture-{budget}"
    staging.write_part("selections", name, selection_table(result, name, pool.column("dataset").to_pylist()))
    return SelectionOutput(weights=weights, selection=name, kept=result.n_kept, rows=len(rows))


def _domains(staging: RunStaging, shards: list[str]) -> dict[str, str]:
    out = {}
    for s in shards:
        t = pq.read_table(staging.part_path("samples", s), columns=["sample_id", "domain", "dataset"])
        dom = pc.coalesce(t.column("domain"), t.column("dataset")).to_pylist()
        out.update(zip(t.column("sample_id").to_pylist(), dom, strict=True))
    return out


@task(name="report", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def report_stage(config: NightlyConfig, store: Store, run_id: str, results: Mapping[str, StageOutput]) -> ReportOutput:
    """HTML + PNG report, staged with the run and committed to <store>/reports/<run_id>/, and a Prefect
    markdown artifact."""
    if not config.report.enabled:
        return ReportOutput(skipped="report disabled")
    staging = store.staging(run_id)
    tables = {name: staging.read(name) for name in ("influence", "mixtures", "layer_curves", "pair_scores")}
    summaries = {}
    if tables["influence"] is not None:
        text = _texts(staging, results["ingest"].shards)
        top = tables["influence"].filter(pc.less(tables["influence"].column("rank"), config.report.top_n))
        top = top.sort_by([("target", "ascending"), ("method", "ascending"), ("rank", "ascending")])
        snippet = [text.get(i, "")[:120] for i in top.column("sample_id").to_pylist()]
        summaries["Top influential training samples"] = top.select(
            ["target", "method", "rank", "dataset", "score"]
        ).append_column("text", pa.array(snippet))
    if tables["mixtures"] is not None:
        summaries["Mixture weights"] = tables["mixtures"]
    out, final = staging.artifact_dir("reports"), staging.final_artifact_path("reports")
    page, markdown = write_report(out, run_id, tables, summaries, final)
    create_markdown_artifact(markdown, key="curation-report", description=f"curation report of run {run_id}")
    return ReportOutput(report=str(page))


def _texts(staging: RunStaging, shards: list[str]) -> dict[str, str]:
    out = {}
    for s in shards:
        t = pq.read_table(staging.part_path("samples", s), columns=["sample_id", "text"])
        out.update(zip(t.column("sample_id").to_pylist(), t.column("text").to_pylist(), strict=True))
    return out


CURATION_STAGES = [
    Stage("influence", influence_stage),
    Stage("select", select_stage, needs=("influence",)),
    Stage("mixture", mixture_stage, needs=("ingest", "influence")),
    Stage("report", report_stage),
]


@flow(name="gradsift-influence", log_prints=True)
def influence_flow(config: NightlyConfig) -> dict:
    """Ingest, then influence / selection / mixture / report on the target's training checkpoints
    (no scoring pass: features come from the checkpoints)."""
    if config.target is None or config.target.checkpoints is None:
        raise ValueError("the influence flow needs target.checkpoints; without them use the nightly flow")
    return run_pipeline("influence", config, CURATION_STAGES, score=False)
