"""The scoring flow: ingest files, then per-sample loss, gradient norms and features."""

from __future__ import annotations

from prefect import flow

from gradsift.flows.pipeline import run_pipeline
from gradsift.schemas.config import RunConfig


@flow(name="gradsift-score", log_prints=True)
def score_flow(config: RunConfig) -> dict:
    """Ingest ``config.ingest.sources`` and score every sample with ``config.model``."""
    return run_pipeline("score", config)
