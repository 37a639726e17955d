"""The nightly curation flow: ingest -> score -> downstream curation stages, one committed run."""

from __future__ import annotations

from prefect import flow

from gradsift.flows.pipeline import run_pipeline
from gradsift.schemas.config import NightlyConfig


@flow(name="gradsift-nightly", log_prints=True)
def nightly_flow(config: NightlyConfig) -> dict:
    """The nightly curation run on ``config`` (see ``NightlyConfig``)."""
    return run_pipeline("nightly", config)
