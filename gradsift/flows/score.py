"""The ingest and scoring runs: files -> samples/quarantine -> per-sample loss, gradient norms, features.

``score``/``ingest`` run the stages directly or as the Prefect flows ``score_flow``/``ingest_flow`` (built, and
prefect imported, on first use) as ``flows.runner`` decides.
"""

from __future__ import annotations

from gradsift.flows.pipeline import run_pipeline
from gradsift.flows.runner import flow_or_direct, lazy_flows
from gradsift.schemas.config import RunConfig


def score_run(config: RunConfig) -> dict:
    """Ingest ``config.ingest.sources`` and score every sample with ``config.model``."""
    return run_pipeline("score", config)


def ingest_run(config: RunConfig) -> dict:
    """Validate, hash and shard ``config.ingest.sources`` into samples and quarantine; no scoring."""
    return run_pipeline("ingest", config, score=False)


def score(config: RunConfig, prefect: bool = False) -> dict:
    """``score_run`` directly, or as the flow ``gradsift-score``."""
    return flow_or_direct(__name__, "score_flow", score_run, config, prefect)


def ingest(config: RunConfig, prefect: bool = False) -> dict:
    """``ingest_run`` directly, or as the flow ``gradsift-ingest``."""
    return flow_or_direct(__name__, "ingest_flow", ingest_run, config, prefect)


__getattr__ = lazy_flows(
    globals(), {"score_flow": ("gradsift-score", score_run), "ingest_flow": ("gradsift-ingest", ingest_run)}
)
