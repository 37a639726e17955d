"""The SQL over a DuckLake store that users see: the current-state views, ``<table>_history`` and ``runs`` with the
snapshot each run made (``storage.catalog.connect_readonly`` creates them on every reader)."""

from __future__ import annotations

import duckdb

from gradsift.storage.lake import CURRENT_GROUPS, LAKE_SCHEMAS, Lake, ident, stored_name, table_mode


def current_view_sql(table: str, alias: str = Lake.ALIAS, version: int | None = None) -> str:
    """The SELECT behind a user-facing view: the current state (or the state at snapshot ``version``).

    Per-run tables: per group, the rows of the completed run committed last. ``runs``: the latest outcome of each
    run (a failed attempt, then the rerun that completed it) with the snapshot its commit made (kept after ``store
    expire`` removes that snapshot); ``samples``: its ``run_id`` (the run that first ingested the row) is called
    ``ingest_run_id``, so that ``scores JOIN samples USING (dataset, sample_id) WHERE run_id = ...`` stays
    unambiguous."""
    at = "" if version is None else f" AT (VERSION => {int(version)})"
    src = f"(SELECT * FROM {alias}.{ident(stored_name(table))}{at})"  # `t AT (...) AS x` does not parse in 1.5.5
    if table == "runs":
        # snapshot_id: DuckLake's virtual column, the snapshot that inserted the row (the run's own transaction);
        # joining snapshots() instead read the catalog's every snapshot on each query (x1.6 of the latest-run
        # subquery after 100 nights, bench/store_growth.py)
        return (
            f"SELECT * FROM (SELECT *, snapshot_id FROM {alias}.runs{at}) "
            "QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY finished_at DESC NULLS LAST) = 1"
        )
    if table == "samples":
        return f"SELECT * EXCLUDE (run_id), run_id AS ingest_run_id FROM {src}"
    if table_mode(table) == "once":
        return f"SELECT * FROM {src}"
    group = CURRENT_GROUPS.get(table, ())
    partition = f"PARTITION BY {', '.join(ident(g) for g in group)}" if group else ""
    # commit order = the runs row's finished_at, written in the run's own transaction under the writer lock (not the
    # snapshot ids: expiring old snapshots removes them from snapshots(), never the rows of the current state)
    runs = (
        f"(SELECT run_id, max(finished_at) AS _run_order FROM {alias}.runs{at} WHERE status = 'completed' GROUP BY ALL)"
    )
    return (
        f"SELECT * EXCLUDE (_run_order) FROM (SELECT h.*, r._run_order FROM {src} AS h JOIN {runs} AS r USING (run_id)) "
        f"QUALIFY _run_order = max(_run_order) OVER ({partition})"
    )


def create_views(con: duckdb.DuckDBPyConnection, alias: str = Lake.ALIAS, version: int | None = None) -> None:
    """One view per table name (the current state, or the state at snapshot ``version``), and ``<table>_history``
    for the per-run tables (every completed run's rows), in the connection's own in-memory database (not TEMP:
    the cursors of the connection see them too)."""
    at = "" if version is None else f" AT (VERSION => {int(version)})"
    for table in LAKE_SCHEMAS:
        con.execute(f"CREATE VIEW {ident(table)} AS {current_view_sql(table, alias, version)}")
        if table_mode(table) == "run":
            history = ident(stored_name(table))
            con.execute(f"CREATE VIEW {history} AS SELECT * FROM {alias}.{history}{at}")


def shard_samples_sql(shards: str) -> str:
    """The samples of the shards in the list ``shards`` (a SQL expression, e.g. ``$shards``), each shard's rows in
    its order and with its name in ``shard``. Found through ``shard_members`` by ``(dataset, sample_id)``, so a
    sample first stored under another shard (an earlier version of the file, another file) is found; a shard
    ingested before ``shard_members`` existed, by the samples' own ``shard`` (its first ingest's)."""
    return (
        f"WITH want AS (SELECT unnest({shards}) AS shard), m AS ("
        "SELECT dataset, sample_id, shard, position FROM shard_members SEMI JOIN want USING (shard) UNION ALL "
        "SELECT dataset, sample_id, shard, line FROM samples SEMI JOIN want USING (shard) "
        "WHERE shard NOT IN (SELECT shard FROM shard_members)) "
        "SELECT s.* REPLACE (m.shard AS shard) FROM m JOIN samples s USING (dataset, sample_id) "
        "ORDER BY m.shard, m.position"
    )
