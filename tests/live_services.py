"""Live services shared by the deployment, fault, incremental and concurrency tests.

One real ``prefect server`` on a free loopback port for the whole test session (its own
PREFECT_HOME, analytics off), and the environment for ``gradsift`` subprocesses: that server as
PREFECT_API_URL and the session's local Ray as RAY_ADDRESS, so a subprocess starts neither.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from prefect.exceptions import ObjectNotFound

GRADSIFT = str(Path(sys.executable).with_name("gradsift"))
_server: dict = {}


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def prefect_server() -> str:
    """The session's Prefect server API URL (started on first use, stopped at exit)."""
    if "url" not in _server:
        home = Path(tempfile.mkdtemp(prefix="gradsift-prefect-server-"))
        port = _free_port()
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",  # the UI's own default is port 4200
        }
        env.pop("PREFECT_API_URL", None)
        log = (home / "server.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(lambda: _stop(proc))
        url = f"http://127.0.0.1:{port}/api"
        wait_for(lambda: proc.poll() is not None or _healthy(url), 120, "prefect server to start", every=0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        _server.update(url=url, home=home)
    return _server["url"]


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def use_prefect_server() -> Iterator[str]:
    """In-process flows and clients talk to the session's server within this block."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = prefect_server()
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


def gradsift_env(tmp: Path, ray) -> dict[str, str]:
    """Environment of a ``gradsift`` subprocess: the session's server and Ray, its own state folders."""
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server(),
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GRADSIFT_STATE": str(tmp / "state"),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    env.pop("GRADSIFT_LOCK_WAIT", None)
    return env


def write_rows(path: Path, n: int, tag: str) -> Path:
    """A JSONL file of ``n`` distinct short texts."""
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"{tag} sample {i}: " + "word " * (2 + i % 5)}) + "\n")
    return path


def nightly_toml(folder: Path, schedule: str = "0 2 * * *") -> Path:
    """A small NightlyConfig file (24 rows, 3 shards) with its data, in ``folder``."""
    data = write_rows(folder / "nightly.jsonl", 24, "nightly")
    path = folder / "curate.toml"
    path.write_text(
        f'store = "store"\nschedule = "{schedule}"\n[[ingest.sources]]\npath = "{data.name}"\n'
        "[ingest]\nshard_size = 8\n[score.engine]\nfeature_dim = 64\n[ray]\nnum_actors = 1\n"
    )
    return path


@contextlib.contextmanager
def served_nightly_run(config: Path, env: dict[str, str], log: Path) -> Iterator[tuple]:
    """`gradsift serve --config CONFIG` in the background; trigger its deployment once and wait.

    Yields (deployment, finished flow run, its artifacts) while the server and ``serve`` still run.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    cron = tomllib.loads(config.read_text()).get("schedule", "0 2 * * *")
    serve = subprocess.Popen(
        [GRADSIFT, "serve", "--config", str(config)],
        env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with use_prefect_server(), get_client(sync_client=True) as client:

            def served():
                try:
                    found = client.read_deployment_by_name("gradsift-nightly/nightly")
                except ObjectNotFound:
                    return None
                return found if [s.schedule.cron for s in found.schedules] == [cron] else None

            deployment = wait_for(served, 90, "gradsift serve to register the deployment", every=1)
            run = run_deployment(deployment.id, timeout=0)
            run = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 180, "the run", every=1)
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
            yield deployment, run, artifacts
    finally:
        _stop(serve)


SCORE_ARGS = ["--shard-size", "8", "--feature-dim", "64", "--num-actors", "1"]
"""Small shards and features: many units of resume work, little compute."""


def score_config(store: Path, files: list[Path], **sections):
    """The RunConfig `gradsift score FILES --store STORE {SCORE_ARGS}` builds, with top-level sections replaced
    (a NightlyConfig where a section is one of its own, such as report)."""
    from gradsift.schemas.config import NightlyConfig, RunConfig

    data = {
        "store": str(store),
        "ingest": {"sources": [{"path": str(p)} for p in files], "shard_size": 8},
        "score": {"engine": {"feature_dim": 64}},
        "ray": {"num_actors": 1},
    }
    model = NightlyConfig if sections.keys() - RunConfig.model_fields.keys() else RunConfig
    return model.model_validate({**data, **sections})
