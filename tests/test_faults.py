"""Faults survived: a Ray scoring worker killed mid-shard, and the whole flow process SIGKILLed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import psutil
from live_services import GRADSIFT, SCORE_ARGS, gradsift_env, score_config, use_prefect_server, wait_for, write_rows

from gradsift.flows.score import score_flow
from gradsift.storage.catalog import query
from gradsift.storage.store import Store

TABLE_KEYS = {
    "samples": ["dataset", "sample_id"],
    "quarantine": ["dataset", "line"],
    "scores": ["dataset", "sample_id"],
    "layer_stats": ["dataset", "sample_id", "layer", "module"],
    "features": ["dataset", "sample_id"],
}


def _scoring_actor() -> psutil.Process | None:
    """A Ray worker whose process title says it is running ScoringWorker.__call__ (a shard) right now."""
    for proc in psutil.process_iter(["cmdline"]):
        if any("ray::ScoringWorker.__call__" in part for part in proc.info["cmdline"] or []):
            return proc
    return None


def test_killed_worker_costs_a_retry_and_every_sample_is_scored_once(tmp_path, ray_local):
    data = write_rows(tmp_path / "a.jsonl", 96, "worker")
    store = Store(tmp_path / "store")
    killed: list[int] = []

    def kill_a_busy_actor() -> None:
        wait_for(lambda: list(store.staging_root.glob("*/scores/*.parquet")), 120, "the first scored shard", 0.05)
        victim = wait_for(_scoring_actor, 60, "an actor scoring a shard", 0.01)
        os.kill(victim.pid, signal.SIGKILL)
        killed.append(victim.pid)

    killer = threading.Thread(target=kill_a_busy_actor, daemon=True)
    killer.start()
    with use_prefect_server():
        result = score_flow(score_config(store.root, [data], ray={"num_actors": 2}))
    killer.join(5)
    assert killed and not psutil.pid_exists(killed[0])
    assert result["status"] == "completed" and result["score"]["shards_scored"] == 12
    counts = query(store, "SELECT count(*) AS n, count(DISTINCT sample_id) AS ids FROM scores").to_pylist()[0]
    missing = query(store, "SELECT count(*) FROM samples ANTI JOIN scores USING (dataset, sample_id)").to_pylist()[0]
    assert counts == {"n": 96, "ids": 96} and list(missing.values()) == [0]


def _committed(store: Store) -> dict[str, list[dict]]:
    return {
        table: query(store, f"SELECT * FROM {table} ORDER BY {', '.join(keys)}").to_pylist()
        for table, keys in TABLE_KEYS.items()
    }


def test_sigkilled_flow_resumes_to_the_same_tables(tmp_path, ray_local):
    data = write_rows(tmp_path / "a.jsonl", 96, "crash")  # 12 shards of 8
    store = Store(tmp_path / "store")
    cmd = [GRADSIFT, "score", str(data), "--store", str(store.root), *SCORE_ARGS]
    env = gradsift_env(tmp_path, ray_local)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        done = wait_for(
            lambda: proc.poll() is None and len(list(store.staging_root.glob("*/scores/*.parquet"))),
            180,
            "some shards scored",
            0.02,
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    [staged] = list(store.staging_root.iterdir())
    scored_before = len(list((staged / "scores").glob("*.parquet")))
    assert 0 < done <= scored_before < 12, "the kill should land mid-run"
    assert store.read_run(staged.name) is None  # what a crash leaves behind: staged work, nothing committed
    assert query(store, "SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 0}]
    status_cmd = [GRADSIFT, "status", "--store", str(store.root)]
    status = subprocess.run(status_cmd, env={**env, "COLUMNS": "200"}, capture_output=True, text=True)
    assert re.search(rf"{staged.name}.*interrupted", status.stdout), status.stdout + status.stderr

    start = time.perf_counter()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    rerun_s = time.perf_counter() - start
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    scored, resumed = map(int, re.search(r"(\d+) shards, (\d+) resumed", rerun.stdout).groups())
    assert scored + resumed == 12 and resumed == scored_before
    run = store.read_run(staged.name)
    assert (run["status"], run["note"]) == ("completed", "resumed")

    reference = Store(tmp_path / "reference")
    with use_prefect_server():
        assert score_flow(score_config(reference.root, [data]))["run_id"] == staged.name
    assert _committed(store) == _committed(reference)
    assert not list(store.staging_root.iterdir())
    print(f"killed after {scored_before}/12 shards; rerun scored {scored} in {rerun_s:.1f}s")
