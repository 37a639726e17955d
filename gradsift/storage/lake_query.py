"""Reading a DuckLake store (PROTOTYPE, see storage.lake and docs/store.md): the current-state and run-snapshot
views, and a locked-down read-only connection that also refuses the DuckLake functions that write."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa

from gradsift.storage.catalog import check_query, locked_down
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
    return con.sql(check_query(con, sql).query).to_arrow_table()
