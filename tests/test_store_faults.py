"""Store faults on the lake. A run's commit is one DuckLake transaction, so two faults of the old layout cannot
happen by construction: a kill "between completed and the catalog rebuild" (there is no derived catalog; the
nearest real fault, a kill right after the commit, before staging is cleared and artifacts moved, is tested) and a reused corrupt
part (nothing is linked: a reused result is a row the lake already has). What is tested instead: the same command
after a kill after the commit, a deleted catalog and a truncated data file named by readers and `store check`, and
a writer that waited for the lock while another process ran the same command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from live_services import GRADSIFT, SCORE_ARGS, gradsift_env, score_config, use_prefect_server, wait_for, write_rows
from typer.testing import CliRunner

from gradsift.cli.commands import app
from gradsift.flows.score import score_flow
from gradsift.storage.catalog import query
from gradsift.storage.check import check_store, lake_files
from gradsift.storage.lock import current_holder
from gradsift.storage.store import Store

KILLED_AFTER_THE_COMMIT = """
import os, signal, sys
from gradsift.cli import app
from gradsift.storage.store import RunStaging
RunStaging.finish = lambda self: os.kill(os.getpid(), signal.SIGKILL)  # dies right after the lake commit
app(sys.argv[1:], prog_name="gradsift")
"""


def counts(store: Store) -> dict:
    """Rows and distinct keys of samples and scores, as a reader sees them."""
    sql = (
        "SELECT (SELECT count(*) FROM samples) AS samples, (SELECT count(*) FROM scores) AS scores, "
        "(SELECT count(DISTINCT (score_key, dataset, sample_id)) FROM scores) AS distinct_scores"
    )
    return query(store, sql).to_pylist()[0]


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})


def test_killed_after_the_commit_the_same_command_finishes_and_touches_nothing(tmp_path, ray_local):
    data = write_rows(tmp_path / "a.jsonl", 48, "commit")
    store = Store(tmp_path / "store")
    cmd = ["score", str(data), "--store", str(store.root), *SCORE_ARGS]
    env = gradsift_env(tmp_path, ray_local)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_THE_COMMIT, *cmd], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    [run] = store.runs()
    assert run["status"] == "completed" and run["rows_written"] > 0
    assert counts(store) == {"samples": 48, "scores": 48, "distinct_scores": 48}  # visible at once: no catalog
    [staged] = list(store.staging_root.iterdir())  # (artifacts left there are moved by the rerun: test_run_artifacts)
    assert staged.name == run["run_id"]

    rerun = subprocess.run([GRADSIFT, *cmd], env={**env, "COLUMNS": "200"}, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "already completed" in rerun.stdout
    assert store.runs() == [run] and counts(store)["scores"] == 48  # the run itself untouched
    assert not list(store.staging_root.iterdir()) and check_store(store) == []


def test_deleted_catalog_is_named_by_readers_writers_and_check(tmp_path, ray_local):
    """The catalog is the lake's history (which files hold which snapshot's rows): it cannot be rebuilt from the
    data files, so every command refuses the store with what to do instead of starting an empty one over them."""
    data = write_rows(tmp_path / "a.jsonl", 24, "deleted")
    store = Store(tmp_path / "store")
    with use_prefect_server():
        score_flow(score_config(store.root, [data]))
    for name in ("lake.sqlite", "lake.sqlite-wal", "lake.sqlite-shm"):
        (store.root / name).unlink(missing_ok=True)
    message = "the lake's catalog .* is missing but its data files are there"
    with pytest.raises(FileNotFoundError, match=message):
        query(store, "SELECT 1")
    with use_prefect_server(), pytest.raises(FileNotFoundError, match=message):
        score_flow(score_config(store.root, [data]))
    for args in (["query", "SELECT 1"], ["store", "check"]):
        out = cli(*args, "--store", str(store.root))
        assert out.exit_code == 2 and "is missing but its data files are there" in out.output, out.output
    assert not (store.root / "lake.sqlite").exists()  # nothing recreated over the orphaned files


def test_truncated_data_file_is_reported_by_check_and_by_the_query_reading_it(tmp_path, ray_local):
    data = write_rows(tmp_path / "a.jsonl", 40, "truncated")
    store = Store(tmp_path / "store")
    with use_prefect_server():
        score_flow(score_config(store.root, [data]))
    [path] = [p for table, p, _ in lake_files(store) if table == "scores"]
    os.truncate(path, path.stat().st_size // 2)  # a torn write, a bad disk: the footer is gone

    [problem] = check_store(store)
    assert (problem.path, problem.table) == (path, "scores") and "unreadable Parquet" in problem.reason
    out = cli("store", "check", "--store", str(store.root))
    assert out.exit_code == 1 and f"broken: {path}: unreadable Parquet" in out.output, out.output
    out = cli("query", "SELECT count(*), avg(loss) FROM scores", "--store", str(store.root))
    assert out.exit_code == 2 and "gradsift store check" in out.output, out.output
    assert query(store, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 40}]  # the rest still reads
    path.unlink()
    [problem] = check_store(store)
    assert problem.reason == "missing"


def _committed(store: Store) -> tuple[dict, int]:
    """(inode, mtime) of every data file of the lake, and its last snapshot."""
    files = {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.lake().data_path.rglob("*.parquet")}
    return files, query(store, "SELECT max(snapshot_id) AS s FROM lake.snapshots()").to_pylist()[0]["s"]


def test_a_writer_that_waited_for_the_lock_finds_the_run_completed_and_touches_nothing(tmp_path, ray_local):
    data = write_rows(tmp_path / "a.jsonl", 48, "waited")
    store = Store(tmp_path / "store").ensure()  # readers can query from the start
    env = {**gradsift_env(tmp_path, ray_local), "GRADSIFT_LOCK_WAIT": "300", "COLUMNS": "200"}
    cmd = [GRADSIFT, "score", str(data), "--store", str(store.root), *SCORE_ARGS]

    def start():
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start()
    wait_for(lambda: (current_holder(store) or {}).get("pid") == first.pid, 120, "the first writer to hold the lock")
    second = start()  # the same command: it waits for the lock
    procs = [first, second]
    seen, errors, committed, run_id = set(), [], None, None
    try:
        while any(p.poll() is None for p in procs):
            try:
                seen.add(tuple(counts(store).values()))
                if committed is None and (runs := store.runs()):
                    run_id, committed = runs[0]["run_id"], _committed(store)  # what the first writer committed
                    assert second.poll() is None, "the second writer should still be waiting"
            except AssertionError:
                raise
            except Exception as err:  # a reader must never fail, whatever the writers are doing
                errors.append(repr(err))
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
    assert _committed(store) == committed  # not one file rewritten or added, no new snapshot
    assert errors == [], errors[:3]
    assert seen <= {(0, 0, 0), (48, 48, 48)}, seen
    assert counts(store) == {"samples": 48, "scores": 48, "distinct_scores": 48}
    assert store.read_run(run_id)["note"] is None and not list(store.staging_root.iterdir())
