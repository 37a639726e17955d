"""The ingest and scoring flows: files -> samples/quarantine -> per-sample loss, gradient norms, features."""

from __future__ import annotations

from prefect import flow

from gradsift.flows.pipeline import run_pipeline
from gradsift.schemas.config import RunConfig


@flow(name="gradsift-score", log_prints=True)
def score_flow(config: RunConfig) -> dict:
    """Ingest ``config.ingest.sources`` and score every sample with ``config.model``."""
    return run_pipeline("score", config)


@flow(name="gradsift-ingest", log_prints=True)
def ingest_flow(config: RunConfig) -> dict:
    """Validate, hash and shard ``config.ingest.sources`` into samples and quarantine; no scoring."""
    return run_pipeline("ingest", config, score=False)
