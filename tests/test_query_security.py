"""`gradsift query` is truly read-only: one SELECT over the store's tables, no files elsewhere, interruptible.

Stores here are built with the Store API only (no Ray, no Prefect).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from live_services import GRADSIFT

from gradsift.schemas.tables import SAMPLES, SCORES, VIEW_NAMES, features_schema
from gradsift.storage.catalog import QueryTimeoutError, ReadOnlyQueryError, query
from gradsift.storage.store import Store

REPO = Path(__file__).resolve().parents[1]
SLOW_SQL = "SELECT count(*) FROM range(1000000000000) a"  # a table function that reads no file; runs for hours
REFUSED = "gradsift query is read-only"
OUTSIDE = "reads only the store's lake"


@pytest.fixture
def store(tmp_path) -> Store:
    """A completed run with scores, samples and features (the lake's scores folder is where a fake file could go)."""
    s = Store(tmp_path / "store").ensure()
    staging = s.staging("r1")
    staging.write_part("scores", "a", pa.Table.from_pylist(
        [{"checkpoint": "final", "dataset": "d", "sample_id": f"s{i}", "loss": float(i)} for i in range(3)],
        schema=SCORES,
    ))  # fmt: skip
    staging.write_part("samples", "a", pa.Table.from_pylist(
        [{"dataset": "d", "sample_id": f"s{i}", "text": f"t{i}"} for i in range(3)], schema=SAMPLES
    ))  # fmt: skip
    staging.write_part("features", "a", pa.Table.from_pylist(
        [{"checkpoint": "final", "dataset": "d", "sample_id": f"s{i}", "feature": [1.0, 2.0]} for i in range(3)],
        schema=features_schema(2),
    ))  # fmt: skip
    staging.commit({"run_id": "r1", "flow": "t", "status": "completed"})
    staging.finish()
    return s


def data(store: Store) -> Path:
    return store.lake().data_path


def snapshot(root: Path) -> dict:
    """Size and mtime of every file, but SQLite's WAL files: any reader of the catalog creates them (the -shm index
    is shared memory); the -wal file must stay empty (no transaction wrote to the catalog)."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.name.endswith(("-shm", "-wal")):
            assert not p.name.endswith("-wal") or p.stat().st_size == 0, p
            continue
        found[str(p.relative_to(root))] = (p.stat().st_size, p.stat().st_mtime_ns)
    return found


def escapes(store: Store, tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (SQL, expected message part). Each would write, reach outside the store or change settings."""
    outside = tmp_path / "secret.txt"
    outside.write_text("secret\n")
    attach = tmp_path / "other.duckdb"
    if not attach.exists():
        con = duckdb.connect(str(attach))
        con.execute("CREATE TABLE t AS SELECT 1 AS a")
        con.close()
    fake = data(store) / "main" / "scores" / "fake.parquet"
    return {
        "copy_to_file": (f"COPY (SELECT 1 AS a) TO '{tmp_path / 'out.csv'}'", "COPY"),
        "copy_fake_scores_part": (f"COPY (SELECT 'final' AS checkpoint) TO '{fake}' (FORMAT parquet)", "COPY"),
        "copy_over_runs_file": (f"COPY (SELECT 'x' AS run_id) TO '{next((data(store) / 'main' / 'runs').glob('*.parquet'))}' (FORMAT parquet)", "COPY"),  # fmt: skip
        "export_database": (f"EXPORT DATABASE '{tmp_path / 'exported'}'", "EXPORT"),
        "install": ("INSTALL httpfs", "LOAD"),
        "force_install": ("FORCE INSTALL httpfs", "LOAD"),
        "load": ("LOAD httpfs", "LOAD"),
        "attach_read_write": (f"ATTACH '{attach}' AS x", "ATTACH"),
        "detach": ("DETACH lake", "DETACH"),
        "set_external_access": ("SET enable_external_access = true", "SET"),
        "reset": ("RESET lock_configuration", "SET"),
        "use": ("USE memory", "SET"),
        "create_table": ("CREATE TABLE t AS SELECT 1 AS a", "CREATE"),
        "create_in_memory_db": ("CREATE TABLE memory.t AS SELECT 1 AS a", "CREATE"),
        "insert": ("INSERT INTO scores (dataset) VALUES ('x')", "INSERT"),
        "update": ("UPDATE scores SET loss = 0", "UPDATE"),
        "delete": ("DELETE FROM scores", "DELETE"),
        "drop_view": ("DROP VIEW scores", "DROP"),
        "call": ("CALL pragma_version()", "CALL"),
        "import_database": (f"IMPORT DATABASE '{tmp_path}'", "Refused while parsing"),  # duckdb 1.5: reads as it parses
        "unnamed_type": ("UPDATE EXTENSIONS", "has no name for"),
        "explain_analyze_copy": (f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp_path / 'ea.csv'}'", "EXPLAIN"),
        "select_then_copy": (f"SELECT 1; COPY (SELECT 1) TO '{tmp_path / 'two.csv'}'", "2 statements"),
        "read_csv_etc_passwd": ("SELECT * FROM read_csv('/etc/passwd', sep = ':')", OUTSIDE),
        "read_text_outside": (f"SELECT content FROM read_text('{outside}')", OUTSIDE),
        "read_text_dotdot": (f"SELECT content FROM read_text('{data(store)}/../../secret.txt')", OUTSIDE),
        "read_staging": (f"SELECT * FROM glob('{store.staging_root}/*')", OUTSIDE),
        "read_url": ("SELECT * FROM read_csv('https://example.com/x.csv')", OUTSIDE),
        "glob_root": ("SELECT * FROM glob('/*')", OUTSIDE),
        "enable_logging_to_file": (
            f"SELECT * FROM enable_logging(storage = 'file', storage_path = '{tmp_path}')",
            "logging functions",
        ),  # fmt: skip
        "ducklake_cleanup": ("SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)", "maintenance"),
        "explain_enable_logging": ("EXPLAIN SELECT * FROM enable_logging(storage = 'file')", "logging functions"),
    }


ESCAPE_NAMES = [
    "copy_to_file", "copy_fake_scores_part", "copy_over_runs_file", "export_database", "install", "force_install",
    "load", "attach_read_write", "detach", "set_external_access", "reset", "use", "create_table",
    "create_in_memory_db", "insert", "update", "delete", "drop_view", "call", "import_database", "unnamed_type",
    "explain_analyze_copy", "select_then_copy", "read_csv_etc_passwd", "read_text_outside", "read_text_dotdot",
    "read_staging", "read_url", "glob_root", "enable_logging_to_file", "ducklake_cleanup", "explain_enable_logging",
]  # fmt: skip


def _assert_nothing_written(store: Store, tmp_path: Path, before_store: dict, before_tmp: set) -> None:
    assert snapshot(store.root) == before_store  # no fake part, runs file untouched, catalog untouched
    assert {p.name for p in tmp_path.iterdir()} == before_tmp  # no out.csv, exported/, ea.csv, two.csv
    assert not (data(store) / "main" / "scores" / "fake.parquet").exists()
    assert query(store, "SELECT count(*) AS n FROM scores").column("n")[0].as_py() == 3
    assert query(store, "SELECT run_id FROM runs").column("run_id").to_pylist() == ["r1"]


def test_every_escape_is_tested(store, tmp_path):
    assert sorted(ESCAPE_NAMES) == sorted(escapes(store, tmp_path))


@pytest.mark.parametrize("name", ESCAPE_NAMES)
def test_library_refuses(store, tmp_path, name):
    sql, message = escapes(store, tmp_path)[name]
    before_store, before_tmp = snapshot(store.root), {p.name for p in tmp_path.iterdir()}
    with pytest.raises(ReadOnlyQueryError) as info:
        query(store, sql)
    text = str(info.value)
    assert message in text and (REFUSED in text or OUTSIDE in text), text
    _assert_nothing_written(store, tmp_path, before_store, before_tmp)


def gradsift(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "COLUMNS": "200"}
    return subprocess.run([str(GRADSIFT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("name", ESCAPE_NAMES)
def test_cli_refuses(store, tmp_path, name):
    sql, message = escapes(store, tmp_path)[name]
    before_store, before_tmp = snapshot(store.root), {p.name for p in tmp_path.iterdir()}
    done = gradsift("query", "--store", str(store.root), sql)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert done.stdout.startswith("error:") and message in " ".join(done.stdout.split()), out
    assert "Traceback" not in out
    _assert_nothing_written(store, tmp_path, before_store, before_tmp)


def test_every_view_and_read_only_statement_still_works(store):
    for table in VIEW_NAMES:
        assert query(store, f"SELECT count(*) AS n FROM {table}").num_rows == 1
    assert query(store, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 3
    assert query(store, "SELECT ingest_run_id FROM samples LIMIT 1").column(0)[0].as_py() == "r1"
    assert query(store, "SELECT feature FROM features LIMIT 1").column(0)[0].as_py() == [1.0, 2.0]
    joined = query(store, "SELECT count(*) FROM scores JOIN samples USING (dataset, sample_id)")
    assert joined.column(0)[0].as_py() == 3
    # the lake's own data files are readable directly too (allowed_directories is <store>/lake_data/)
    direct = query(store, f"SELECT count(*) FROM read_parquet('{data(store)}/main/runs/*.parquet')")
    assert direct.column(0)[0].as_py() == 1
    for sql in ["DESCRIBE scores", "SHOW TABLES", "SUMMARIZE scores", "FROM scores", "VALUES (1)",
                "WITH a AS (SELECT 1 AS x) SELECT * FROM a", "EXPLAIN SELECT * FROM scores",
                "EXPLAIN ANALYZE SELECT count(*) FROM scores", "SELECT 1;", "SELECT count(*) FROM range(10)",
                "PIVOT scores ON dataset IN ('d') USING count(*)", "PRAGMA version"]:  # fmt: skip; PRAGMA version is a SELECT in duckdb 1.5
        assert query(store, sql).num_rows >= 1, sql


def test_empty_and_unparsable_sql(store):
    with pytest.raises(ReadOnlyQueryError, match="no SQL statement"):
        query(store, "  -- only a comment")
    with pytest.raises(duckdb.ParserException):
        query(store, "SELEC 1")


def test_concurrent_queries_in_one_process(store):
    """Each query has its own locked DuckDB instance, so readers in threads never trip over each other's lock."""
    results, errors = [], []

    def reader():
        try:
            for _ in range(5):
                results.append(query(store, "SELECT count(*) AS n FROM scores").column("n")[0].as_py())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [3] * 20


def test_library_timeout_interrupts(store):
    start = time.monotonic()
    with pytest.raises(QueryTimeoutError, match="timeout of 0.5 s"):
        query(store, SLOW_SQL, timeout=0.5)
    assert time.monotonic() - start < 3


def test_cli_formats_still_work(store, tmp_path):
    sql = "SELECT sample_id, loss FROM scores ORDER BY sample_id"
    table = gradsift("query", "--store", str(store.root), sql)
    assert table.returncode == 0 and "s2" in table.stdout, table.stdout + table.stderr
    csv = gradsift("query", "--store", str(store.root), "--format", "csv", sql)
    assert csv.returncode == 0 and csv.stdout.splitlines()[0] == '"sample_id","loss"'
    js = gradsift("query", "--store", str(store.root), "--format", "json", sql)
    assert js.returncode == 0 and js.stdout.splitlines()[0] == '{"sample_id": "s0", "loss": 0.0}'
    out = tmp_path / "out.parquet"
    pqt = gradsift("query", "--store", str(store.root), "--format", "parquet", "-o", str(out), sql)
    assert pqt.returncode == 0 and pq.read_table(out).num_rows == 3


def _wait_until_querying(proc: subprocess.Popen) -> None:
    """Until DuckDB's thread pool exists in the child (it connected), then a little longer."""
    tasks = Path(f"/proc/{proc.pid}/task")
    deadline = time.monotonic() + 30
    while tasks.exists() and len(list(tasks.iterdir())) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0 if tasks.exists() else 4.0)
    assert proc.poll() is None, "the slow query ended before it could be interrupted"


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "COLUMNS": "200"}
    return subprocess.Popen(
        [str(GRADSIFT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_cli_sigint_stops_a_slow_query_within_5s(store):
    """About 1-2 s at a load average of 2; up to 6 s seen at a load of 19 (the process exit slows too)."""
    proc = _start("query", "--store", str(store.root), SLOW_SQL)
    try:
        _wait_until_querying(proc)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 5, f"took {took:.1f} s"
    assert proc.returncode == 130, out
    assert "query interrupted" in out and "Traceback" not in out and "Aborted" not in out


def test_cli_timeout_stops_a_slow_query(store):
    start = time.monotonic()
    done = gradsift("query", "--store", str(store.root), "--timeout", "1", SLOW_SQL, timeout=30)
    out = done.stdout + done.stderr
    assert done.returncode == 124, out
    assert "timed out" in out and "--timeout 1" in out and "Traceback" not in out
    assert time.monotonic() - start < 15


def test_cli_rejects_a_bad_timeout(store):
    done = gradsift("query", "--store", str(store.root), "--timeout", "0", "SELECT 1")
    assert done.returncode == 2 and "--timeout must be a positive" in done.stdout
