"""The nightly curation flow: ingest -> score -> influence -> select -> mixture -> report, one committed run.

The downstream stages skip themselves when their config section (target, mixture) is absent."""

from __future__ import annotations

from prefect import flow

from gradsift.flows.influence import CURATION_STAGES
from gradsift.flows.pipeline import run_pipeline
from gradsift.schemas.config import NightlyConfig


@flow(name="gradsift-nightly", log_prints=True)
def nightly_flow(config: NightlyConfig) -> dict:
    """The nightly curation run on ``config`` (see ``NightlyConfig``)."""
    return run_pipeline("nightly", config, CURATION_STAGES)
