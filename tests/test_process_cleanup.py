"""Killing the CLI stops what it started: the reaper, a CLI SIGKILLed mid-run, and the local Ray's processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
from live_services import GRADSIFT, SCORE_ARGS, wait_for, write_rows

from gradsift.reaper import POLL_S
from gradsift.storage.store import Store

# A stand-in CLI: starts the reaper, a child, and a grandchild that ignores SIGTERM; prints the child's pid.
FAKE_CLI = """
import subprocess, sys, time
from gradsift.reaper import start
start()
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {stubborn!r}]); time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running: same pid and creation time (psutil checks both), not a zombie."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _kill(procs: list[psutil.Process]) -> None:
    for proc in _alive(procs):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil refuses a pid that now names another process


def _sigkill_and_time(cli: subprocess.Popen, descendants: list[psutil.Process]) -> float:
    """SIGKILL the CLI process alone; seconds until none of ``descendants`` runs (fails after 10 s)."""
    os.kill(cli.pid, signal.SIGKILL)
    cli.wait(10)
    start = time.monotonic()
    wait_for(lambda: not _alive(descendants), 10, "every process the killed CLI had started to be gone", 0.05)
    return time.monotonic() - start


def test_reaper_stops_the_cli_descendants_and_nothing_else():
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like a joined Ray
    cli = subprocess.Popen([sys.executable, "-c", FAKE_CLI], stdout=subprocess.PIPE, text=True, start_new_session=True)
    descendants: list[psutil.Process] = []
    try:
        child = psutil.Process(int(cli.stdout.readline()))
        wait_for(lambda: len(child.children()) == 1, 30, "the grandchild to start")
        descendants = psutil.Process(cli.pid).children(recursive=True)
        assert len(descendants) == 3  # reaper, child, grandchild
        time.sleep(3 * POLL_S)  # the reaper has recorded them
        seconds = _sigkill_and_time(cli, descendants)
        assert outsider.poll() is None, "the reaper must not touch what the CLI did not start"
        print(f"reaper: everything gone {seconds:.1f}s after the SIGKILL")
    finally:
        _kill(descendants)
        outsider.kill()
        outsider.wait()


def test_sigkilled_cli_leaves_no_process_behind(tmp_path):
    data = write_rows(tmp_path / "a.jsonl", 96, "reap")  # 12 shards of 8
    store = Store(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "GRADSIFT_LOCK_WAIT")}
    env.update(
        GRADSIFT_STATE=str(tmp_path / "state"),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    # --prefect: the flow on a temporary Prefect server, so that the reaper has both services to stop
    cmd = [GRADSIFT, "score", str(data), "--store", str(store.root), *SCORE_ARGS, "--prefect"]
    log = (tmp_path / "cli.log").open("wb")
    cli = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    descendants: list[psutil.Process] = []
    try:
        wait_for(
            lambda: cli.poll() is not None or list(store.staging_root.glob("*/scores/*.parquet")),
            240,
            "a scored shard",
            0.05,
        )
        descendants = psutil.Process(cli.pid).children(recursive=True)
        assert cli.poll() is None, "the kill should land mid-run: " + (tmp_path / "cli.log").read_text()[-3000:]
        names = {p.name() for p in descendants}
        assert {"raylet", "gcs_server"} <= names, names
        cmdlines = [" ".join(p.cmdline()) for p in descendants]
        assert any("gradsift.reaper" in c for c in cmdlines) and any("uvicorn" in c for c in cmdlines), cmdlines
        seconds = _sigkill_and_time(cli, descendants)
        print(f"CLI SIGKILLed mid-run: its {len(descendants)} descendants gone after {seconds:.1f}s")
    finally:
        _kill(descendants)
        if cli.poll() is None:
            cli.kill()
            cli.wait()


ENSURE_RAY = """
import json, os, psutil, ray
from gradsift.schemas.config import RayConfig
from gradsift.executors.ray import ensure_ray
ensure_ray(RayConfig())
children = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
print(json.dumps({"children": children, "runtime_env": ray.get_runtime_context().runtime_env}))
ray.shutdown()
"""


def test_local_ray_starts_without_the_dashboard_or_a_runtime_env():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", ENSURE_RAY], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["runtime_env"] == {}  # the workers inherit the driver's environment
    # Ray 2.60 still starts its dashboard head, but with no UI and only the usage-stats module (which probes
    # cloud metadata addresses), and the raylet's dashboard and runtime-env agents: no option turns them off.
    heads = [c for c in report["children"] if "dashboard/dashboard.py" in c]
    assert all("--disable-frontend" in c and "--modules-to-load=UsageStatsHead" in c for c in heads), heads
