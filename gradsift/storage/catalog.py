"""The DuckDB catalog: read-only SQL over the store's Parquet tables.

``catalog.duckdb`` holds only views (absolute paths) and is rebuilt as a temp file then renamed into
place (``storage.atomic``), so readers never see a half-built catalog and a writer never holds it open.
Derived tables show rows of completed runs only.

Values in the SQL gradsift runs are bound parameters (``query(store, sql, params)``); only the catalog's
DDL (a view's SELECT cannot be prepared) quotes its paths into the text, escaped by ``_sql_path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from gradsift.schemas.tables import TABLES
from gradsift.storage.atomic import write_atomic
from gradsift.storage.store import Store

DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float16(): "FLOAT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
}


def duck_type(t: pa.DataType) -> str:
    """The DuckDB column type of an Arrow type (lists of any length; float16 read as FLOAT)."""
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        return f"{duck_type(t.value_type)}[]"
    return DUCK_TYPES[t]


def _empty_select(schema: pa.Schema, with_run_id: bool) -> str:
    cols = [f"NULL::{duck_type(f.type)} AS {f.name}" for f in schema]
    if with_run_id:
        cols.insert(0, "NULL::VARCHAR AS run_id")
    return f"SELECT {', '.join(cols)} WHERE false"


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def view_sql(store: Store, table: str, schema: pa.Schema | None) -> str:
    """The SELECT behind one view."""
    if table == "runs":
        if not any((store.tables / "runs").glob("*.parquet")):
            return _empty_select(TABLES["runs"], with_run_id=False)
        return f"SELECT * FROM read_parquet('{_sql_path(store.tables / 'runs')}/*.parquet', union_by_name=true)"
    if not store.table_has_data(table):
        if schema is None:  # features: dimension unknown until a run writes some
            return (
                "SELECT NULL::VARCHAR AS run_id, NULL::VARCHAR AS checkpoint, NULL::VARCHAR AS dataset, "
                "NULL::VARCHAR AS sample_id, NULL::FLOAT[] AS feature WHERE false"
            )
        return _empty_select(schema, with_run_id=True)
    glob = f"{_sql_path(store.tables / table)}/run_id=*/*.parquet"
    body = (
        f"SELECT * FROM read_parquet('{glob}', hive_partitioning=true, union_by_name=true, "
        "hive_types={'run_id': VARCHAR}) WHERE run_id IN (SELECT run_id FROM runs WHERE status = 'completed')"
    )
    if schema is not None:  # every schema column, NULL in older parts without it (even when no part has it yet)
        body = f"{_empty_select(schema, with_run_id=False)} UNION ALL BY NAME {body}"
    if table == "samples":  # one row per (dataset, sample_id), the latest ingest wins; joins USING (sample_id)
        body = (  # stay unambiguous, so its run column is called ingest_run_id
            f"SELECT * EXCLUDE (run_id), run_id AS ingest_run_id FROM ({body}) "
            "QUALIFY row_number() OVER (PARTITION BY dataset, sample_id ORDER BY ingest_run_id DESC) = 1"
        )
    return body


class CatalogError(RuntimeError):
    """The catalog could not be built: a part its views read is broken (unreadable Parquet)."""


CATALOG_TAG = "gradsift catalog "
REBUILD_HINT = "`gradsift store rebuild-catalog --store {root}` rebuilds it (or rerun the command of the last run)"


def _views(store: Store) -> list[tuple[str, str]]:
    return [(table, view_sql(store, table, schema)) for table, schema in [*TABLES.items(), ("features", None)]]


def _signature(views: list[tuple[str, str]]) -> str:
    """What the catalog is built from (every view's SQL), recorded in it as the comment of the runs view."""
    return CATALOG_TAG + hashlib.sha256(json.dumps(views).encode()).hexdigest()[:16]


def build_catalog(store: Store) -> Path:
    """(Re)build ``catalog.duckdb`` atomically; returns its path.

    A view reads its table's parts by glob, so new runs show without a rebuild, except where a table (or the
    runs table) had no parts when the catalog was built: its view is then an empty SELECT. The catalog records
    what it was built from (``catalog_problem`` compares it with the store as it is now)."""
    store.ensure()
    views = _views(store)

    def build(tmp: Path) -> None:
        con = duckdb.connect(str(tmp))
        try:
            for table, sql in views:
                con.execute(f"CREATE VIEW {table} AS {sql}")
            con.execute(f"COMMENT ON VIEW runs IS '{_signature(views)}'")  # hex digits: nothing to escape
        finally:
            con.close()

    try:
        return write_atomic(store.catalog_path, build)
    except duckdb.Error as err:  # a view reads the footer of every part of its table as it is created
        raise CatalogError(
            f"cannot build the catalog {store.catalog_path}: {err}\n`gradsift store check --store {store.root}` "
            "lists the broken parts; rerunning the command of their run recomputes them"
        ) from err


def catalog_problem(store: Store) -> str | None:
    """Why ``catalog.duckdb`` does not show the store as it is now: "missing", "unreadable" or "out of date"
    (built before a table had its first rows, e.g. by a run killed between completing and rebuilding it, or by
    another gradsift version, or for the store at another path); None when it is current."""
    if not store.catalog_path.exists():
        return "missing"
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH '{_sql_path(store.catalog_path)}' AS catalog (READ_ONLY)")  # duckdb 1.5 binds no $path here
        found = con.execute(
            "SELECT comment FROM duckdb_views() WHERE database_name = 'catalog' AND view_name = 'runs'"
        ).fetchall()
    except duckdb.Error:
        return "unreadable"
    finally:
        con.close()
    return None if found == [(_signature(_views(store)),)] else "out of date"


def ensure_catalog(store: Store) -> str | None:
    """Rebuild the catalog where ``catalog_problem`` finds one (the caller holds the writer lock); returns it."""
    problem = catalog_problem(store)
    if problem is not None:
        build_catalog(store)
    return problem


class ReadOnlyQueryError(RuntimeError):
    """A statement that ``query`` refuses: anything but one read-only SELECT (see ``check_read_only``)."""


class QueryTimeoutError(RuntimeError):
    """A query ran past its ``timeout`` and was interrupted."""


# What query() runs: one SELECT (DESCRIBE, SHOW, SUMMARIZE, FROM-first, VALUES, PIVOT ... IN (...) parse as SELECT),
# or EXPLAIN [ANALYZE] of one. Everything else is refused by statement type, before it runs.
_EXPLAIN = re.compile(r"\s*EXPLAIN(?:\s+ANALYZE)?\s+(.*)", re.IGNORECASE | re.DOTALL)
_REFUSED_HINT = (
    "gradsift query is read-only: it runs one SELECT (or EXPLAIN SELECT) over the catalog's tables; tables change "
    "through flows (gradsift score / nightly / select)"
)


def _statement_type(statement) -> duckdb.StatementType | None:
    try:
        return statement.type
    except ValueError:  # a type the Python client has no name for (e.g. UPDATE EXTENSIONS is 29)
        return None


def _is_select(statements: list) -> bool:
    return len(statements) == 1 and _statement_type(statements[0]) == duckdb.StatementType.SELECT


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str):
    """The one statement of ``sql`` if it is a read-only SELECT, else ``ReadOnlyQueryError``.

    Uses DuckDB's own parser (a parse error is DuckDB's ``ParserException``). Exactly one statement per call:
    ``SELECT 1; SELECT 2`` is refused rather than run in part.
    """
    try:
        statements = con.extract_statements(sql)
    except duckdb.PermissionException as err:  # duckdb 1.5: IMPORT DATABASE reads its files while parsing
        raise ReadOnlyQueryError(f"{_REFUSED_HINT}. Refused while parsing: {err}") from err
    if not statements:
        raise ReadOnlyQueryError('no SQL statement to run: give one SELECT, e.g. "SELECT count(*) FROM scores"')
    if len(statements) > 1:
        raise ReadOnlyQueryError(f"{_REFUSED_HINT}. Refused: {len(statements)} statements; give one at a time")
    statement = statements[0]
    kind = _statement_type(statement)
    if kind == duckdb.StatementType.SELECT:
        return statement
    if kind == duckdb.StatementType.EXPLAIN:
        inner = _EXPLAIN.fullmatch(statement.query)
        if inner and _is_select(con.extract_statements(inner.group(1))):
            return statement
        raise ReadOnlyQueryError(f"{_REFUSED_HINT}. Refused: EXPLAIN of anything but one SELECT")
    named = kind is not None and kind.name.isidentifier()  # duckdb 1.5 names unknown types "???"
    name = kind.name if named else "one DuckDB's Python client has no name for"
    hint = " (a PIVOT needs an explicit IN (...) list to be a single SELECT)" if name == "MULTI" else ""
    raise ReadOnlyQueryError(f"{_REFUSED_HINT}. Refused statement type: {name}{hint}")


# Table functions a read-only query must not call: DuckLake maintenance deletes data files BEFORE it fails on a
# read-only catalog (measured: ducklake_cleanup_old_files removed scheduled files from a READ_ONLY attach), and
# enable_logging(storage='file') passes lock_configuration in duckdb 1.5.5 then aborts the process on its write;
# postgres_query / sqlite_* reach the catalog database directly (a READ_ONLY attach makes them read-only, still).
_DENIED = re.compile(
    r"^(ducklake_(?!snapshots$|table_info$|list_files$|table_changes$|table_insertions$|table_deletions$|current_snapshot$|last_committed_snapshot$).*"
    r"|postgres_.*|sqlite_.*|enable_logging|disable_logging|truncate_duckdb_logs|checkpoint|force_checkpoint)$",
    re.IGNORECASE,
)


def _function_names(node) -> Iterator[str]:
    if isinstance(node, dict):
        if node.get("class") == "FUNCTION" or node.get("type") in ("FUNCTION", "TABLE_FUNCTION"):
            name = node.get("function_name")
            if isinstance(name, str):
                yield name
        for value in node.values():
            yield from _function_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _function_names(value)


def denied_functions(con: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
    """Functions of ``sql`` (one SELECT) that a read-only query refuses to run; raises on what cannot parse."""
    tree = json.loads(con.execute("SELECT json_serialize_sql($sql)", {"sql": sql}).fetchall()[0][0])  # fetched whole: duckdb 2 keeps a half-read result open
    if tree.get("error"):
        raise ValueError(f"cannot check the statement: {tree.get('error_message')}")
    return sorted({n for n in _function_names(tree) if _DENIED.match(n)})


def check_query(con: duckdb.DuckDBPyConnection, sql: str):
    """``check_read_only`` plus the function denylist: the statement ``query`` may run."""
    statement = check_read_only(con, sql)
    inner = _EXPLAIN.fullmatch(statement.query)
    denied = denied_functions(con, inner.group(1) if inner else statement.query)
    if denied:
        raise ReadOnlyQueryError(
            f"{_REFUSED_HINT}; settings are locked: it does not run lake maintenance or logging functions ({denied})"
        )
    return statement


def connect_readonly(store: Store) -> duckdb.DuckDBPyConnection:
    """A private, locked-down DuckDB connection over ``catalog.duckdb``.

    A fresh in-memory instance (so concurrent readers in one process never share, or fight over, its settings)
    attaches the catalog READ_ONLY, then: files only under ``<store>/tables/`` (what the views read), no other
    file, network or extension access (``enable_external_access=false``, no extension autoinstall or autoload),
    no Python replacement scans, and ``lock_configuration=true`` so no statement can undo any of it.
    ``allowed_directories`` can only be set on a started database and before external access is off, so it
    and the two after it are SETs; the rest are connect-time config.
    """
    if not store.catalog_path.exists():
        if any((store.tables / "runs").glob("*.parquet")):
            raise FileNotFoundError(
                f"no catalog at {store.catalog_path}, though the store has runs: "
                + REBUILD_HINT.format(root=store.root)
            )
        raise FileNotFoundError(
            f"no catalog at {store.catalog_path}: run a flow first (e.g. `gradsift demo` or `gradsift score`) "
            "or point --store at an existing store"
        )

    def attach(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"ATTACH '{_sql_path(store.catalog_path)}' AS catalog (READ_ONLY)")  # duckdb 1.5 binds no $path here
        con.execute("USE catalog")

    return locked_down(attach, [f"{store.tables}{os.sep}"])


def locked_down(attach, allowed: list[str]) -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB with no extension autoinstall/autoload and no Python replacement scans; after
    ``attach(con)`` it may read files only under ``allowed``, reaches nothing else and its settings are locked."""
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "python_enable_replacements": False,
        },
    )
    try:
        attach(con)
        con.execute("SET allowed_directories = $dirs", {"dirs": allowed})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _refusal(store: Store, err: BaseException) -> BaseException:
    """DuckDB's refusals of a SELECT (a file outside the store, a locked setting) as gradsift's own error."""
    text = str(err)
    if isinstance(err, duckdb.PermissionException):
        return ReadOnlyQueryError(
            f"gradsift query reads only the store's tables under {store.tables}{os.sep}: no other files, network "
            f"or extensions. DuckDB said: {text}"
        )
    if isinstance(err, duckdb.Error) and ("configuration has been locked" in text or "read-only" in text.lower()):
        return ReadOnlyQueryError(f"{_REFUSED_HINT}; settings are locked. DuckDB said: {text}")
    return err


def query(store: Store, sql: str, params: dict | list | None = None, timeout: float | None = None) -> pa.Table:
    """Run one read-only SELECT against the catalog and return an Arrow table.

    ``params``: values bound to the statement's parameters (``$name`` with a dict, ``?`` / ``$1`` with a list);
    code that puts a value in a query passes it here, never in the SQL text. Refuses anything but one
    read-only SELECT with ``ReadOnlyQueryError`` (see ``check_read_only``; parameters are bound into the
    statement it checked, so they cannot change what runs). The query runs in a worker
    thread so that Ctrl-C (``KeyboardInterrupt``, re-raised once DuckDB has stopped) and ``timeout`` seconds
    (``QueryTimeoutError``) interrupt it at once instead of when DuckDB next returns to Python.
    """
    with _ctrl_c_latch() as ctrl_c:
        return _query_interruptibly(store, sql, params, timeout, ctrl_c)


@contextmanager
def _ctrl_c_latch() -> Iterator[threading.Event]:
    """An event set by every Ctrl-C while the block runs, beside the usual ``KeyboardInterrupt``.

    DuckDB calls that run in the main thread (attach, the statement check) can swallow the ``KeyboardInterrupt`` a
    Ctrl-C raises during them (seen under load: the query then ran on, uninterrupted); the event survives that.
    """
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def on_sigint(signum: int, frame: object) -> None:
        pressed.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _query_interruptibly(
    store: Store, sql: str, params: dict | list | None, timeout: float | None, ctrl_c: threading.Event
) -> pa.Table:
    con = connect_readonly(store)
    done = threading.Event()  # not Thread.join: a Ctrl-C inside join() can mark a running thread as stopped
    done.set()
    try:
        statement = check_query(con, sql)
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["table"] = con.sql(statement, params=params).to_arrow_table()
            except BaseException as err:  # handed to the waiting thread
                outcome["error"] = err
            finally:
                done.set()

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            done.clear()  # inside the try: a Ctrl-C during start() still interrupts the started worker
            threading.Thread(target=run, name="gradsift-query", daemon=True).start()
            while not done.is_set():
                if ctrl_c.is_set():
                    raise KeyboardInterrupt
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise QueryTimeoutError(f"query interrupted after its timeout of {timeout:g} s")
                done.wait(0.1 if left is None else min(0.1, left))
        except BaseException:  # KeyboardInterrupt or the timeout: stop DuckDB, give the worker time to notice
            # Again and again: DuckDB clears the flag when a query starts, so one interrupt sent while the worker
            # is still binding is lost (seen under load).
            for _ in range(100):
                con.interrupt()
                if done.wait(0.1):
                    break
            raise
        if "error" in outcome:
            err = outcome["error"]
            refused = _refusal(store, err)
            if refused is err:
                raise err
            raise refused from err
        return outcome["table"]
    finally:
        if done.is_set():  # else DuckDB ignored the interrupt for 10 s: leave the daemon worker to process exit
            con.close()
