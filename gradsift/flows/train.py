"""The proxy-training run: ingest -> (embed) -> train each seed on Ray -> combine scores -> commit.

One committed run: ``samples``, ``dynamics`` (a row per sample visit) and ``scores`` (EL2N, GraNd,
forgetting, AUM, VoG, TracIn self-influence), plus checkpoints under ``<store>/checkpoints``.
Rerunning the same config resumes (finished seeds and epochs are skipped) or does nothing. ``train`` runs the
stages directly or as the Prefect flow ``train_flow`` (built, and prefect imported, on first use) as
``flows.runner`` decides.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gradsift.executors.ray import run_jobs
from gradsift.flows.runner import flow_or_direct, lazy_flows, markdown_artifact, stage
from gradsift.flows.runs import RunRecorder, run_logger, run_recorded
from gradsift.flows.stages import ingest_config, ingest_stage
from gradsift.models.embeddings import cached_embeddings
from gradsift.models.loading import minilm_path
from gradsift.schemas.train import TrainConfig
from gradsift.signals.dynamics import combine_seeds
from gradsift.training.jobs import train_and_score_seed
from gradsift.training.loop import scores_table
from gradsift.training.proxy import embed_cache_dir


def resolve_model(name: str) -> str:
    """'minilm' -> the packaged all-MiniLM-L6-v2 folder; anything else as given."""
    return str(minilm_path()) if name == "minilm" else name


@stage("embed")
def embed_stage(config: TrainConfig, base: str, staging) -> int:
    """Frozen mode: embed every sample once into the cache (with a progress bar), so that the seeds only read it."""
    samples = staging.read("samples")
    texts = samples.column("text").to_pylist()
    pairs = samples.column("text_pair").to_pylist() if "text_pair" in samples.column_names else None
    cache = embed_cache_dir(config)
    started = time.perf_counter()
    with Progress(TextColumn("[bold]embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        job = bar.add_task("embed", total=None)
        emb = cached_embeddings(
            cache,
            base,
            texts,
            config.max_length,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
            pairs=pairs,
        )
        embedded = bar.tasks[0].completed
    run_logger().info(
        "embeddings: %d texts, %d new (%.0f s), the rest from the cache %s", len(texts), embedded,
        time.perf_counter() - started, cache,
    )  # fmt: skip
    return len(emb)


@stage("train-seeds")
def train_stage(config: TrainConfig, base: str, run_id: str, label_index: dict | None) -> list[dict]:
    """Train and score every seed (a seed an item of the Ray pool when there are several)."""
    jobs = [(config, base, run_id, seed, label_index) for seed in config.seeds]
    return run_jobs(train_and_score_seed, jobs, config.ray)


@stage("combine-scores")
def combine_stage(config: TrainConfig, staging, run_id: str, aum_threshold: float | None) -> dict:
    """Average the seeds' scores into one ``scores`` row per sample (signals.dynamics.combine_seeds)."""
    samples = staging.read("samples").select(["dataset", "sample_id", "label"]).to_pandas()
    seeds = [
        pq.read_table(p).to_pandas().set_index("sample_id").loc[samples["sample_id"]]
        for p in staging.scratch.parts("seed_scores")
    ]
    groups = samples["label"].to_numpy() if config.vog_normalise == "class" else None
    combined = combine_seeds(seeds, groups, config.gradient_scores)
    table = scores_table(f"{run_id}-seed*", samples["dataset"].tolist(), samples["sample_id"].tolist(), combined)
    staging.write_part("scores", "train", table)
    flagged = int((combined["aum"] < aum_threshold).sum()) if aum_threshold is not None else None
    return {
        "flagged": flagged,
        "samples": table.num_rows,
        "never_learned": int(pa.compute.sum(table["never_learned"]).as_py() or 0),
    }


def train_run(config: TrainConfig) -> dict:
    """Proxy-train ``config.model`` on ``config.data``; log dynamics; write checkpoints and scores."""
    base = resolve_model(config.model)

    def body(recorder: RunRecorder) -> dict:
        staging, run_id = recorder.staging, recorder.run_id
        ingest = ingest_stage(ingest_config(config.store, base, config.data, config.task == "classification"), staging)
        if config.mode == "frozen":
            embed_stage(config, base, staging)
        seeds = train_stage(config, base, run_id, ingest.label_index)
        recorder.row["checkpoint"] = json.dumps([s["train_run_id"] for s in seeds])
        thresholds = [s["aum_threshold"] for s in seeds if s["aum_threshold"] is not None]
        threshold = float(np.mean(thresholds)) if thresholds else None
        combined = combine_stage(config, staging, run_id, threshold)
        if threshold is not None:
            recorder.row["note"] = f"aum_threshold={threshold:.6g} flagged={combined['flagged']}"
        markdown_artifact(
            f"# gradsift train `{run_id}`\n\n- samples: {ingest.samples}, seeds: {config.seeds}, "
            f"epochs: {config.epochs}, mode: {config.mode}{' (LoRA)' if config.lora else ''}\n"
            f"- never learned (all seeds): {combined['never_learned']}\n"
            f"- AUM threshold (threshold samples): {threshold}, flagged as mislabelled: {combined['flagged']}\n"
            f"- checkpoints: `{Path(config.store) / 'checkpoints'}/{run_id}-seed*`\n",
            "train-report",
        )
        return {
            "samples": ingest.samples,
            "seeds": seeds,
            "label_index": ingest.label_index,
            "aum_threshold": threshold,
            "flagged": combined["flagged"],
        }

    return run_recorded("train", config, [config.data], base, body)


def train(config: TrainConfig, prefect: bool = False) -> dict:
    """``train_run`` directly, or as the flow ``gradsift-train``."""
    return flow_or_direct(__name__, "train_flow", train_run, config, prefect)


__getattr__ = lazy_flows(globals(), {"train_flow": ("gradsift-train", train_run)})
