"""Prefect tasks, one per pipeline stage: coarse units with retries (DESIGN: keep Prefect tasks
coarse, drive Ray directly inside them). Each stage is resumable through its staging markers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gradsift.schemas.config import RunConfig
from gradsift.schemas.tables import SAMPLES
from gradsift.storage.store import RunStaging, Store
from gradsift.tasks.batching import count_tokens
from gradsift.tasks.ingest import ingest_source, shard_samples
from gradsift.tasks.models import load_tokenizer, task_of_folder
from gradsift.tasks.pool import ensure_ray, score_shards


@task(name="ingest", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def ingest_stage(config: RunConfig, staging: RunStaging) -> dict:
    """Validate and shard every source into the run's staging folder; bad rows go to quarantine."""
    done = staging.stage_info("ingest")
    if done is not None:
        get_run_logger().info("ingest already done for this run: %d samples, skipping", done["samples"])
        return done
    tokenizer = load_tokenizer(config.model.name_or_path)
    task_type = task_of_folder(config.model.name_or_path, config.model.num_labels)

    def n_tokens(prompt, response, text):
        return count_tokens(tokenizer, task_type, prompt, response, text)

    shards: list[str] = []
    labels: set[str] = set()
    n_samples = n_quarantined = 0
    for source in config.ingest.sources:
        result = ingest_source(source, n_tokens, config.model.max_tokens)
        for name, rows in shard_samples(result.samples, result.dataset, config.ingest.shard_size):
            staging.write_part("samples", name, pa.Table.from_pylist(rows, schema=SAMPLES))
            shards.append(name)
        staging.write_part("quarantine", result.dataset, result.quarantine_table())
        labels.update(s["label"] for s in result.samples if s["label"] is not None)
        n_samples += len(result.samples)
        n_quarantined += len(result.quarantine)
        get_run_logger().info(
            "ingested %s: %d samples, %d quarantined", source.path, len(result.samples), len(result.quarantine)
        )
    info = {
        "samples": n_samples,
        "quarantined": n_quarantined,
        "shards": shards,
        "task": task_type,
        "label_index": {label: i for i, label in enumerate(sorted(labels))} if task_type == "classification" else None,
    }
    staging.mark_done("ingest", info)
    return info


@task(name="score", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def score_stage(config: RunConfig, store: Store, run_id: str, ingest: dict) -> dict:
    """Per-sample loss, gradient norm, layer stats and features for every shard, on Ray actors."""
    logger = get_run_logger()
    staging = store.staging(run_id)
    done = staging.stage_info("score")
    if done is not None:
        return done
    where = ensure_ray(config.ray)
    shards = ingest["shards"]
    logger.info("scoring %d shards on Ray %s with %d actors", len(shards), where, config.ray.num_actors)
    artifact = create_progress_artifact(progress=0.0, description=f"scoring {len(shards)} shards of run {run_id}")
    with Progress(
        TextColumn("[bold]scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ) as bar:
        job = bar.add_task("score", total=len(shards), rate="")
        bar.update(job, completed=sum(staging.has_part("scores", s) for s in shards))

        def on_done(info: dict, n_done: int, n_todo: int) -> None:
            bar.update(job, advance=1, rate=f"{info['rows'] / max(info['seconds'], 1e-9):.1f} samples/s")
            update_progress_artifact(artifact, progress=100.0 * n_done / n_todo)

        result = score_shards(
            store,
            run_id,
            shards,
            config.model,
            config.score.engine,
            config.ray,
            ingest["label_index"],
            config.seed,
            on_done,
        )
    info = {
        "shards_scored": result.shards_scored,
        "shards_resumed": result.shards_skipped,
        "rows": _count_rows(staging, "scores"),
        "seconds": round(result.seconds, 2),
        "parameter_set": result.parameter_set,
    }
    logger.info(
        "scored %d shards (%d already done) in %.1fs", result.shards_scored, result.shards_skipped, result.seconds
    )
    staging.mark_done("score", info)
    return info


def _count_rows(staging: RunStaging, table: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in staging.parts(table))
