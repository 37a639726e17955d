"""The nightly curation flow: ingest -> score -> influence -> select -> mixture -> auto-select -> report, one
committed run.

The downstream stages skip themselves when their config section (target, mixture, auto_select) is absent."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from gradsift.flows.auto_select import plot_trials, samples_auto_selection, trials_table
from gradsift.flows.influence import CURATION_STAGES
from gradsift.flows.pipeline import Stage, run_pipeline
from gradsift.flows.retry import retry_transient
from gradsift.schemas.config import NightlyConfig
from gradsift.schemas.stages import SelectionOutput, StageOutput
from gradsift.selection.subsets import selection_table
from gradsift.storage.store import Store


@task(name="auto-select", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def auto_select_stage(
    config: NightlyConfig, store: Store, run_id: str, results: Mapping[str, StageOutput]
) -> SelectionOutput:
    """``select --auto`` on the run's labelled samples (the target datasets left out): every trial to
    ``selection_trials`` and a plot, the choice and its reason to ``selections``."""
    section = config.auto_select
    if section is None:
        return SelectionOutput(skipped="no auto_select section")
    staging = store.staging(run_id)
    targets = set(config.target.datasets) if config.target else set()
    parts = [pq.read_table(staging.part_path("samples", s)) for s in results["ingest"].shards]
    rows = [r for r in pa.concat_tables(parts, promote_options="default").to_pylist() if r["dataset"] not in targets]
    if not rows or any(r["label"] is None for r in rows):
        return SelectionOutput(skipped="auto_select needs labelled samples (a label field on every source)")
    cache = section.embed_cache or str(Path(store.root) / "embeddings")
    name, result, auto = samples_auto_selection(section, rows, cache)
    trials = trials_table(name, auto)
    staging.write_part("selection_trials", name, trials)
    plot_trials(trials, staging.artifact_path("reports", "selection_trials.png"))
    staging.write_part("selections", name, selection_table(result, name, [r["dataset"] for r in rows]))
    return SelectionOutput(selection=name, kept=result.n_kept, rows=len(rows))


NIGHTLY_STAGES = [*CURATION_STAGES[:-1], Stage("auto_select", auto_select_stage), CURATION_STAGES[-1]]
"""The curation stages with ``select --auto`` before the report."""


@flow(name="gradsift-nightly", log_prints=True)
def nightly_flow(config: NightlyConfig) -> dict:
    """The nightly curation run on ``config`` (see ``NightlyConfig``)."""
    return run_pipeline("nightly", config, NIGHTLY_STAGES)
