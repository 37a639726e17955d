"""Startup (issue 16): the small commands import neither torch, transformers, ray nor prefect; a command runs
its stages directly unless a Prefect server is configured or asked for; a small input is scored in this process,
and writes the same scores as on Ray actors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from live_services import score_config
from test_run_artifacts import TRAIN_RUN, tiny_train_store

HEAVY = ("torch", "transformers", "ray", "prefect")
# Runs the command line in a fresh interpreter as the `gradsift` script does, then prints the heavy modules loaded.
PROBE = """
import json, sys
from gradsift.cli import app
sys.argv = ["gradsift", *json.loads(sys.argv[1])]
try:
    app()
except SystemExit as done:
    assert not done.code, done.code
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["query", "SELECT count(*) FROM scores"],
        ["select", "--scores-run", TRAIN_RUN, "--score", "el2n", "--drop", "hard", "--fractions", "0.5"],
    ],
    ids=lambda argv: argv[0],
)
def test_small_commands_import_no_torch_ray_or_prefect(tmp_path, monkeypatch, argv):
    store = tiny_train_store(tmp_path / "store")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code = PROBE.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([*argv, "--store", str(store.root)])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_run_modules_import_prefect_only_when_a_flow_is_asked_for():
    """Every command's run module (score, select, train, evaluate, analyze) imports without prefect; asking a
    module for its flow builds it then."""
    modules = ["score", "select", "train", "evaluate", "analyze"]
    code = (
        "import importlib, json, sys\n"
        f"mods = [importlib.import_module('gradsift.flows.' + m) for m in {modules!r}]\n"
        "before = 'prefect' in sys.modules\n"
        "flow = mods[2].train_flow\n"
        "print(json.dumps([before, flow.name, mods[2].train_flow is flow]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, "gradsift-train", True]


def test_the_policy_runs_directly_unless_a_server_is_configured_or_asked(monkeypatch):
    from gradsift.flows.runner import use_prefect

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert not use_prefect() and use_prefect(asked=True)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert use_prefect()


def test_in_process_only_for_a_small_input_without_a_cluster():
    from gradsift.executors.ray import in_process
    from gradsift.schemas.config import RayConfig

    assert in_process(RayConfig(address=None), 2) and not in_process(RayConfig(address=None), 3)
    assert not in_process(RayConfig(address="auto"), 1)
    assert not in_process(RayConfig(address=None, in_process_max_shards=0), 1)


def _scores(store_root):
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store

    store = Store(store_root)
    return {
        table: query(store, f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY ALL").to_pylist()
        for table in ("scores", "layer_stats", "features")
    }


def test_direct_in_process_score_writes_what_the_flow_on_ray_writes(tmp_path, monkeypatch, ray_local, prefect_harness):
    """The same rows scored directly in this process (no Prefect, no Ray) and as the Prefect flow on Ray actors
    (``in_process_max_shards=0``) give identical scores; the direct run imports neither for its own work."""
    from gradsift.flows import score as runs

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " * (i % 5 + 1)}) + "\n" for i in range(12)))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    calls = []
    monkeypatch.setattr(runs, "score_flow", lambda config: calls.append(config), raising=False)
    direct = runs.score(score_config(tmp_path / "direct", [data], model={"name_or_path": "tiny"}))
    assert direct["status"] == "completed" and calls == []
    monkeypatch.undo()
    on_ray = score_config(tmp_path / "ray", [data], model={"name_or_path": "tiny"}, ray={"in_process_max_shards": 0})
    flowed = runs.score(on_ray, prefect=True)
    assert flowed["status"] == "completed" and flowed["score"]["shards_scored"] == direct["score"]["shards_scored"] == 2
    written = _scores(tmp_path / "direct")
    assert len(written["scores"]) == 12 and written["features"]
    assert written == _scores(tmp_path / "ray")
