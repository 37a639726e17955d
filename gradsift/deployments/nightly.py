"""The nightly curation flow as a Prefect deployment, on the cron schedule of its config (UTC).

Deployments are built from the flow objects themselves (module-path entrypoints such as
``gradsift.flows.nightly.nightly_flow``), never from hand-typed strings, so they cannot go stale;
``tests/test_deployments.py`` resolves every entrypoint in ``FLOWS``.

Two ways to run them (a Prefect server is needed for schedules: ``gradsift server``):

- ``gradsift serve --config curate.toml``: this process registers the deployment and runs it on
  schedule, in the foreground (``prefect.serve``).
- ``gradsift deploy --config curate.toml --work-pool gradsift-process``: registers it with a
  process work pool; ``prefect worker start --pool gradsift-process`` on a machine with gradsift
  installed runs it.
"""

from __future__ import annotations

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from gradsift.flows.nightly import nightly_flow
from gradsift.schemas.config import NightlyConfig

DEPLOYMENT_NAME = "nightly"
FLOWS: dict[str, Flow] = {DEPLOYMENT_NAME: nightly_flow}
"""Deployment name -> the flow object it runs."""


def nightly_deployment(config: NightlyConfig) -> RunnerDeployment:
    """The nightly deployment of ``config``: its schedule, and the resolved config as its parameter."""
    return nightly_flow.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(config.schedule, timezone="UTC")],
        parameters={"config": config.model_dump(mode="json")},
        description=f"gradsift nightly curation into {config.store} ({len(config.ingest.sources)} sources)",
        tags=["gradsift"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def ensure_process_pool(name: str) -> None:
    """Create a process work pool called ``name`` unless it exists."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def register(config: NightlyConfig, work_pool: str) -> str:
    """Register the nightly deployment with ``work_pool`` (a process pool, created if missing); its id."""
    ensure_process_pool(work_pool)
    return str(nightly_deployment(config).apply(work_pool_name=work_pool))
