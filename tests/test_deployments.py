"""The nightly deployment: entrypoints resolve, `gradsift deploy` registers the cron schedule on a real
Prefect server, and `gradsift serve` runs a triggered nightly run that publishes the three artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from live_services import GRADSIFT, gradsift_env, use_prefect_server, wait_for, write_rows
from prefect.flows import load_flow_from_entrypoint

from gradsift.deployments.nightly import FLOWS, nightly_deployment
from gradsift.schemas.config import NightlyConfig


def _config_toml(tmp_path: Path, schedule: str = "0 2 * * *") -> Path:
    data = write_rows(tmp_path / "nightly.jsonl", 24, "nightly")
    path = tmp_path / "curate.toml"
    path.write_text(
        f'store = "store"\nschedule = "{schedule}"\n[[ingest.sources]]\npath = "{data.name}"\n'
        "[ingest]\nshard_size = 8\n[score.engine]\nfeature_dim = 64\n[ray]\nnum_actors = 1\n"
    )
    return path


def test_every_entrypoint_resolves(tmp_path):
    config = NightlyConfig.from_toml(_config_toml(tmp_path))
    for name, flow in FLOWS.items():
        deployment = nightly_deployment(config)
        assert deployment.name == name
        assert load_flow_from_entrypoint(deployment.entrypoint).name == flow.name


def test_deploy_registers_the_cron_schedule(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from gradsift.cli import app

    with use_prefect_server() as url:
        monkeypatch.setenv("PREFECT_API_URL", url)
        out = CliRunner().invoke(app, ["deploy", "--config", str(_config_toml(tmp_path, "30 3 * * *"))])
        assert out.exit_code == 0, out.output
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("gradsift-nightly/nightly")
        assert deployment.work_pool_name == "gradsift-process"
        assert deployment.entrypoint == "gradsift.flows.nightly.nightly_flow"
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 3 * * *", "UTC")


@pytest.mark.slow
def test_serve_runs_a_triggered_nightly_with_artifacts(tmp_path, ray_local):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    config = _config_toml(tmp_path)
    env = {**gradsift_env(tmp_path, ray_local), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [GRADSIFT, "serve", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with use_prefect_server(), get_client(sync_client=True) as client:

            def served():
                try:
                    found = client.read_deployment_by_name("gradsift-nightly/nightly")
                except Exception:  # not registered yet
                    return None
                return found if [s.schedule.cron for s in found.schedules] == ["0 2 * * *"] else None

            deployment = wait_for(served, 90, "gradsift serve to register the deployment", every=1)
            run = run_deployment(deployment.id, timeout=0)
            run = wait_for(
                lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 180, "the nightly run", every=1
            )
            assert run.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
        kinds = {a.type: a for a in artifacts}
        assert {"progress", "table", "markdown"} <= set(kinds), [a.type for a in artifacts]
        assert kinds["progress"].data == 100.0
        assert "SELECT count(*) FROM scores" in kinds["markdown"].data
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(30)
