"""Reading a DuckLake store (PROTOTYPE, see storage.lake and docs/store.md): the current-state and run-snapshot
views, and a locked-down read-only connection that also refuses the DuckLake functions that write."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from gradsift.storage.catalog import locked_down
from gradsift.storage.lake import CURRENT_GROUPS, LAKE_SCHEMAS, Lake, ident, literal, stored_name, table_mode


def run_snapshots_sql(alias: str = Lake.ALIAS) -> str:
    """run_id -> the snapshot its commit made (run ids are content hashes: only snapshots order runs in time)."""
    return (
        "SELECT json_extract_string(commit_extra_info, '$.run_id') AS run_id, max(snapshot_id) AS snapshot_id "
        f"FROM {alias}.snapshots() WHERE commit_extra_info IS NOT NULL GROUP BY ALL"
    )


def current_view_sql(table: str, alias: str = Lake.ALIAS, version: int | None = None) -> str:
    """The SELECT behind a user-facing view: the current state (or the state at snapshot ``version``)."""
    at = "" if version is None else f" AT (VERSION => {int(version)})"
    src = f"(SELECT * FROM {alias}.{ident(stored_name(table))}{at})"  # `t AT (...) AS x` does not parse in 1.5.5
    if table == "runs":
        return f"SELECT r.*, s.snapshot_id FROM {src} AS r LEFT JOIN ({run_snapshots_sql(alias)}) AS s USING (run_id)"
    if table_mode(table) == "once":
        return f"SELECT * FROM {src}"
    group = CURRENT_GROUPS.get(table, ())
    partition = f"PARTITION BY {', '.join(ident(g) for g in group)}" if group else ""
    return (
        f"SELECT * EXCLUDE (_run_snapshot) FROM (SELECT h.*, s.snapshot_id AS _run_snapshot FROM {src} AS h "
        f"JOIN ({run_snapshots_sql(alias)}) AS s USING (run_id)) "
        f"QUALIFY _run_snapshot = max(_run_snapshot) OVER ({partition})"
    )


# Table functions a read-only query must not call: DuckLake maintenance deletes data files BEFORE it fails on the
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
    """Functions of ``sql`` (one SELECT) that ``connect_readonly`` refuses to run; raises on what cannot parse."""
    tree = json.loads(con.execute("SELECT json_serialize_sql($sql)", {"sql": sql}).fetchone()[0])
    if tree.get("error"):
        raise ValueError(f"cannot check the statement: {tree.get('error_message')}")
    return sorted({n for n in _function_names(tree) if _DENIED.match(n)})


def connect_readonly(root: Path | str, catalog: str = "duckdb") -> duckdb.DuckDBPyConnection:
    """A locked-down reader: the lake attached READ_ONLY, one temp view per table name showing the current state,
    ``<table>_history`` views for the per-run tables, files only under the lake's data path, no other file, network
    or extension access, settings locked (the same settings as ``storage.catalog.connect_readonly``). Run user SQL
    through ``query_readonly`` (it also refuses DuckLake's maintenance functions)."""
    lake = Lake(root, catalog)

    def attach(con: duckdb.DuckDBPyConnection) -> None:
        lake._load(con)
        con.execute(f"ATTACH {literal(lake.uri)} AS {Lake.ALIAS} (READ_ONLY)")
        for table in LAKE_SCHEMAS:
            con.execute(f"CREATE TEMP VIEW {ident(table)} AS {current_view_sql(table)}")
            if table_mode(table) == "run":
                history = ident(stored_name(table))
                con.execute(f"CREATE TEMP VIEW {history} AS SELECT * FROM {Lake.ALIAS}.{history}")

    allowed = [f"{lake.data_path}{os.sep}"]
    if catalog in ("duckdb", "sqlite"):
        allowed.append(str(lake.uri.rsplit(":", 1)[1]))
    return locked_down(attach, allowed)


def query_readonly(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """One read-only SELECT on a ``connect_readonly`` connection (gradsift's statement check plus the denylist)."""
    from gradsift.storage.catalog import ReadOnlyQueryError, check_read_only

    statement = check_read_only(con, sql)
    denied = denied_functions(con, statement.query)
    if denied:
        raise ReadOnlyQueryError(f"gradsift query does not run lake maintenance or logging functions: {denied}")
    return con.sql(statement.query).to_arrow_table()
