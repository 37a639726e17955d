"""The nightly deployment: entrypoints resolve, `gradsift deploy` registers the cron schedule on a real
Prefect server, and `gradsift serve` runs a triggered nightly run that publishes the three artifacts."""

from __future__ import annotations

import json

import pytest
from live_services import gradsift_env, nightly_toml, served_nightly_run, use_prefect_server
from prefect.flows import load_flow_from_entrypoint

from gradsift.deployments.nightly import FLOWS, nightly_deployment
from gradsift.schemas.config import NightlyConfig


def test_every_entrypoint_resolves(tmp_path):
    config = NightlyConfig.from_toml(nightly_toml(tmp_path))
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
        out = CliRunner().invoke(app, ["deploy", "--config", str(nightly_toml(tmp_path, "30 3 * * *"))])
        assert out.exit_code == 0, out.output
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("gradsift-nightly/nightly")
        assert deployment.work_pool_name == "gradsift-process"
        assert deployment.entrypoint == "gradsift.flows.nightly.nightly_flow"
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 3 * * *", "UTC")


@pytest.mark.slow
def test_serve_runs_a_triggered_nightly_with_artifacts(tmp_path, ray_local):
    config, log = nightly_toml(tmp_path), tmp_path / "serve.log"
    with served_nightly_run(config, gradsift_env(tmp_path, ray_local), log) as (_, run, artifacts):
        assert run.state.is_completed(), log.read_text()[-3000:]
    by_key = {a.key: a for a in artifacts if a.key}
    assert {a.type for a in artifacts} >= {"progress", "table", "markdown"}, [(a.type, a.key) for a in artifacts]
    assert [a.data for a in artifacts if a.type == "progress"] == [100.0]  # updated per finished shard
    assert [r["stage"] for r in json.loads(by_key["stage-counts"].data)][:2] == ["ingest", "score"]
    assert "SELECT count(*) FROM scores" in by_key["run-report"].data
