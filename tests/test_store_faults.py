"""Store faults the same command repairs: a kill before the catalog rebuild, a deleted catalog, a corrupt committed
part, and a writer that waited for the lock while another process ran the same command."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from live_services import GRADSIFT, SCORE_ARGS, gradsift_env, score_config, use_prefect_server, wait_for, write_rows
from typer.testing import CliRunner

from gradsift.cli.commands import app
from gradsift.flows.score import score_flow
from gradsift.storage.catalog import CatalogError, build_catalog, catalog_problem, query
from gradsift.storage.check import check_store
from gradsift.storage.lock import current_holder
from gradsift.storage.store import Store

KILLED_BEFORE_THE_CATALOG = """
import os, signal, sys
from gradsift.cli import app
import gradsift.flows.runs as runs
runs.build_catalog = lambda store: os.kill(os.getpid(), signal.SIGKILL)  # dies right after the run row says completed
app(sys.argv[1:], prog_name="gradsift")
"""


def counts(store: Store) -> dict:
    """Rows and distinct keys of samples and scores, as a reader sees them."""
    sql = (
        "SELECT (SELECT count(*) FROM samples) AS samples, (SELECT count(*) FROM scores) AS scores, "
        "(SELECT count(DISTINCT (run_id, dataset, sample_id)) FROM scores) AS distinct_scores"
    )
    return query(store, sql).to_pylist()[0]


def per_run(store: Store) -> dict[str, tuple[int, int]]:
    sql = "SELECT run_id, count(*) AS n, count(DISTINCT sample_id) AS ids FROM scores GROUP BY run_id"
    return {r["run_id"]: (r["n"], r["ids"]) for r in query(store, sql).to_pylist()}


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})


def test_killed_between_completed_and_the_catalog_the_same_command_rebuilds_it(tmp_path, ray_local):
    data = write_rows(tmp_path / "a.jsonl", 48, "catalog")
    store = Store(tmp_path / "store")
    build_catalog(store)  # an earlier catalog, built before the tables had rows: their views are empty
    cmd = ["score", str(data), "--store", str(store.root), *SCORE_ARGS]
    env = gradsift_env(tmp_path, ray_local)
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_THE_CATALOG, *cmd], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    [run] = store.runs()
    assert run["status"] == "completed" and run["rows_written"] > 0
    assert counts(store)["scores"] == 0 and catalog_problem(store) == "out of date"  # what the kill leaves
    status = cli("status", "--store", str(store.root))
    assert "is out of date" in status.output and "gradsift store rebuild-catalog" in status.output, status.output

    rerun = subprocess.run([GRADSIFT, *cmd], env={**env, "COLUMNS": "200"}, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "already completed" in rerun.stdout
    assert catalog_problem(store) is None
    assert counts(store) == {"samples": 48, "scores": 48, "distinct_scores": 48}
    assert per_run(store) == {run["run_id"]: (48, 48)} and store.runs() == [run]  # the run itself untouched
    assert not list(store.staging_root.iterdir()) and check_store(store) == []


def test_deleted_catalog_is_named_by_readers_and_rebuilt_by_the_same_command(tmp_path, ray_local):
    data = write_rows(tmp_path / "a.jsonl", 24, "deleted")
    store = Store(tmp_path / "store")
    with use_prefect_server():
        first = score_flow(score_config(store.root, [data]))
    store.catalog_path.unlink()
    with pytest.raises(FileNotFoundError, match="though the store has runs: `gradsift store rebuild-catalog --store"):
        query(store, "SELECT 1")
    out = cli("query", "SELECT 1", "--store", str(store.root))
    assert out.exit_code == 2 and "gradsift store rebuild-catalog" in out.output, out.output
    out = cli("status", "--store", str(store.root))
    assert out.exit_code == 0 and f"{store.catalog_path} is missing" in out.output, out.output
    assert cli("store", "check", "--store", str(store.root)).exit_code == 1  # a missing catalog is a problem

    with use_prefect_server():
        again = score_flow(score_config(store.root, [data]))
    assert (again["status"], again["run_id"], again["rows"]) == ("already completed", first["run_id"], first["rows"])
    assert catalog_problem(store) is None
    assert counts(store) == {"samples": 24, "scores": 24, "distinct_scores": 24}

    store.catalog_path.unlink()  # the command the messages name rebuilds it too
    out = cli("store", "rebuild-catalog", "--store", str(store.root))
    assert out.exit_code == 0 and catalog_problem(store) is None, out.output
    out = cli("store", "check", "--store", str(store.root))
    assert out.exit_code == 0 and "all whole; catalog current" in out.output, out.output


def test_corrupt_part_is_not_reused_and_the_same_command_recomputes_it(tmp_path, ray_local, caplog):
    old = write_rows(tmp_path / "old.jsonl", 40, "old")  # 5 shards of 8
    new = write_rows(tmp_path / "new.jsonl", 24, "new")
    store = Store(tmp_path / "store")
    with use_prefect_server():
        first = score_flow(score_config(store.root, [old]))
    part = store.committed_parts("scores", first["run_id"])[2]
    original = pq.read_table(part)
    os.truncate(part, part.stat().st_size // 2)  # a torn write, a bad disk: the footer is gone

    [problem] = check_store(store)
    assert (problem.path, problem.run_id, problem.table) == (part, first["run_id"], "scores")
    assert "unreadable Parquet" in problem.reason
    out = cli("store", "check", "--store", str(store.root))
    assert out.exit_code == 1 and f"broken: {part}: unreadable Parquet" in out.output, out.output

    caplog.set_level(logging.WARNING)
    with use_prefect_server(), pytest.raises(CatalogError, match="gradsift store check"):
        score_flow(score_config(store.root, [old, new]))  # commits, but no catalog reads past the broken part
    [second] = [r for r in store.runs() if r["run_id"] != first["run_id"]]
    assert second["status"] == "completed"  # its rows are all written: the catalog's failure does not undo that
    shared = {p.name for p in store.committed_parts("scores", first["run_id"])}
    for mine in store.committed_parts("scores", second["run_id"]):
        theirs = part.with_name(mine.name)
        linked = mine.name in shared and os.path.samefile(mine, theirs)
        assert linked == (mine.name in shared and mine.name != part.name), mine  # every good shard reused, not it
    assert pq.read_table(store.tables / "scores" / f"run_id={second['run_id']}" / part.name).equals(original)
    assert f"not reusing {part} of run {first['run_id']}: unreadable Parquet" in caplog.text
    assert [p.path for p in check_store(store)] == [part]  # the new run did not link it

    with use_prefect_server():
        repaired = score_flow(score_config(store.root, [old]))  # the command of the run with the broken part
    assert repaired["status"] == "completed" and repaired["run_id"] == first["run_id"]
    assert repaired["score"]["shards_resumed"] + repaired["score"]["shards_reused"] == 5  # nothing rescored
    assert store.read_run(first["run_id"])["note"] == "repaired: 1 broken parts recomputed"
    assert check_store(store) == [] and catalog_problem(store) is None
    assert pq.read_table(part).equals(original)
    with use_prefect_server():
        assert score_flow(score_config(store.root, [old, new]))["status"] == "already completed"
    assert per_run(store) == {first["run_id"]: (40, 40), second["run_id"]: (64, 64)}
    assert counts(store) == {"samples": 64, "scores": 104, "distinct_scores": 104}


def _files(store: Store, run_id: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every committed file of a run, its run row included."""
    paths = [*store.tables.glob(f"*/run_id={run_id}/*.parquet"), store.run_path(run_id)]
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_a_writer_that_waited_for_the_lock_finds_the_run_completed_and_touches_nothing(tmp_path, ray_local):
    data = write_rows(tmp_path / "a.jsonl", 48, "waited")
    store = Store(tmp_path / "store")
    build_catalog(store)  # readers can query from the start
    env = {**gradsift_env(tmp_path, ray_local), "GRADSIFT_LOCK_WAIT": "300", "COLUMNS": "200"}
    cmd = [GRADSIFT, "score", str(data), "--store", str(store.root), *SCORE_ARGS]

    def start():
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start()
    wait_for(lambda: (current_holder(store) or {}).get("pid") == first.pid, 120, "the first writer to hold the lock")
    second = start()  # the same command: it waits for the lock
    procs = [first, second]
    seen, errors, committed = set(), [], None
    try:
        while any(p.poll() is None for p in procs):
            try:
                seen.add(tuple(counts(store).values()))
            except Exception as err:  # a reader must never fail, whatever the writers are doing
                errors.append(repr(err))
            [run_file] = list((store.tables / "runs").glob("*.parquet")) or [None]
            if committed is None and run_file and store.read_run(run_file.stem)["status"] == "completed":
                run_id, committed = run_file.stem, _files(store, run_file.stem)  # what the first writer committed
                assert second.poll() is None, "the second writer should still be waiting"
            time.sleep(0.05)
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert committed is not None, "never saw the run completed"
    assert f"gradsift run {run_id}: completed" in outputs[0], outputs[0]
    assert f"gradsift run {run_id}: already completed" in outputs[1], outputs[1]
    assert _files(store, run_id) == committed  # not one part (nor the run row) rewritten, no part added
    assert errors == [], errors[:3]
    assert seen <= {(0, 0, 0), (48, 48, 48)}, seen
    assert counts(store) == {"samples": 48, "scores": 48, "distinct_scores": 48}
    assert store.read_run(run_id)["note"] is None and not list(store.staging_root.iterdir())
