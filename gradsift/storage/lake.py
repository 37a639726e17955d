"""A DuckLake store: PROTOTYPE of the store issue's table format (spike, see docs/store.md).

Self-contained on purpose: nothing in gradsift imports this module yet, the flows still write the Parquet store
(``storage.store`` / ``storage.catalog``). Wiring it into ``flows/runs.py`` and ``flows/incremental.py`` is the
migration (docs/store.md, "Migration plan").

Needs duckdb 1.5.x with the ``duckdb-extension-ducklake`` wheel of the same version (offline from PyPI); the
duckdb 2.0 wheels have no ducklake extension and ``INSTALL`` needs the network. ``ducklake_extension()`` finds the
extension file; ``LakeUnavailable`` says why when it cannot.

Layout under ``root``::

    lake.ducklake      the catalog (a DuckDB file; ``catalog="sqlite"`` -> lake.sqlite, or a PostgreSQL DSN)
    lake_data/         Parquet data files, written and removed only by DuckLake

Tables (``TABLE_MODES``):

* ``once``: samples, scores, layer_stats, features. One row per natural key (``NATURAL_KEYS``, the scoring key
  ``score_key`` = hash of model, weights, checkpoint, score config and code first); ``commit_run`` skips rows
  whose key is already stored, so a nightly run over unchanged data adds a snapshot and no rows. ``run_id``
  is the run that first computed the row. Earlier states: time travel (``AT (VERSION => n)``).
* ``run``: every other derived table, stored as ``<table>_history`` with ``run_id``; the ``<table>`` view is the
  latest run's rows per ``CURRENT_GROUPS`` group (e.g. per selection), latest by commit snapshot (run ids are
  hashes, not times).
* ``runs``: one row per run, appended in the same transaction as its results; the commit's snapshot records
  the run id (``commit_extra_info``), so the ``runs`` view shows which snapshot each run made.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import duckdb
import pyarrow as pa

from gradsift.schemas.tables import TABLES

NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "samples": ("dataset", "sample_id"),
    "scores": ("score_key", "checkpoint", "dataset", "sample_id"),
    "layer_stats": ("score_key", "checkpoint", "dataset", "sample_id", "layer", "module"),
    "features": ("score_key", "checkpoint", "dataset", "sample_id"),
}
"""Tables stored once per key: a row whose key is already in the lake is not written again."""

SCORE_TABLES = ("scores", "layer_stats", "features")
"""Tables that carry the scoring key (``score_key`` column)."""

CURRENT_GROUPS: dict[str, tuple[str, ...]] = {
    "influence": ("target", "method"),
    "influence_topk": ("target", "method"),
    "selections": ("selection",),
    "evaluations": ("selection",),
    "pair_scores": ("dataset",),
    "layer_curves": ("dataset",),
    "layer_diffs": ("dataset",),
    "dynamics": ("checkpoint",),
}
"""Per-run tables: the current view keeps, per group, the rows of the latest run that wrote the group
(no group, e.g. ``mixtures`` or ``quarantine``: the latest run that wrote the table)."""

FEATURES_SCHEMA = pa.schema(
    [
        ("checkpoint", pa.string()),
        ("dataset", pa.string()),
        ("sample_id", pa.string()),
        ("feature", pa.list_(pa.float32())),
    ]
)
"""DuckLake 1.5 stores no fixed-size ARRAY (``FLOAT[k]``: "unsupported type"): features are ``FLOAT[]``."""

LAKE_SCHEMAS: dict[str, pa.Schema] = {**TABLES, "features": FEATURES_SCHEMA}


def table_mode(table: str) -> str:
    if table == "runs":
        return "runs"
    return "once" if table in NATURAL_KEYS else "run"


def stored_name(table: str) -> str:
    """The lake table behind a view name: ``<table>_history`` for per-run tables, else the name itself."""
    return f"{table}_history" if table_mode(table) == "run" else table


class LakeUnavailable(RuntimeError):
    """The ducklake extension cannot be loaded (duckdb without the matching ``duckdb-extension-ducklake``)."""


def _extension(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LakeUnavailable(
            f"{package} is not importable (duckdb {duckdb.__version__}): pip install --target .duck 'duckdb==1.5.5' "
            f"'{package.replace('_', '-', 2)}==1.5.5' and put .duck first on PYTHONPATH (duckdb 2.0 has no such wheel)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "extensions" / f"v{duckdb.__version__}"
    path = path / f"{name}.duckdb_extension"
    if not path.exists():
        found = sorted(p.name for p in path.parent.parent.glob("v*"))
        raise LakeUnavailable(f"no {name} extension for duckdb {duckdb.__version__} (the wheel has {found})")
    return path


def ducklake_extension() -> Path:
    """The ducklake extension file of the installed ``duckdb-extension-ducklake`` wheel."""
    return _extension("duckdb_extension_ducklake", "ducklake")


_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float16(): "FLOAT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
}


def duck_type(t: pa.DataType) -> str:
    """The DuckLake column type of an Arrow type (lists of any length, float16 widened to FLOAT)."""
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        return f"{duck_type(t.value_type)}[]"
    return _DUCK_TYPES[t]


def _widen(t: pa.DataType) -> pa.DataType:
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        return pa.list_(_widen(t.value_type))
    return t


def _arrow_for_duckdb(data: pa.Table) -> pa.Table:
    """float16 (features) as float32: DuckDB's Arrow scan refuses half floats, DuckLake stores FLOAT anyway."""
    schema = pa.schema([f.with_type(_widen(f.type)) for f in data.schema])
    return data if schema == data.schema else data.cast(schema)


def lake_columns(table: str) -> list[tuple[str, str]]:
    """(name, type) of a lake table: ``run_id`` first, ``score_key`` for scoring tables, then the schema."""
    cols = [] if table == "runs" else [("run_id", "VARCHAR")]
    if table in SCORE_TABLES:
        cols.append(("score_key", "VARCHAR"))
    cols += [(f.name, duck_type(f.type)) for f in LAKE_SCHEMAS[table]]
    return cols


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


class Lake:
    """One attached DuckLake (the writer's handle; readers use ``connect_readonly``)."""

    ALIAS = "lake"

    def __init__(self, root: Path | str, catalog: str = "duckdb", inline_rows: int | None = None):
        self.root = Path(root).resolve()
        self.catalog = catalog
        self.data_path = self.root / "lake_data"
        self.inline_rows = inline_rows
        self.con: duckdb.DuckDBPyConnection | None = None

    @property
    def uri(self) -> str:
        if self.catalog == "duckdb":
            return f"ducklake:{self.root / 'lake.ducklake'}"
        if self.catalog == "sqlite":
            return f"ducklake:sqlite:{self.root / 'lake.sqlite'}"
        return f"ducklake:postgres:{self.catalog}"  # a libpq DSN, e.g. "dbname=gradsift host=db"

    def _load(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"LOAD {_lit(str(ducklake_extension()))}")
        if self.catalog == "sqlite":
            con.execute(f"LOAD {_lit(str(_extension('duckdb_extension_sqlite_scanner', 'sqlite_scanner')))}")
        elif self.catalog != "duckdb":
            con.execute(f"LOAD {_lit(str(_extension('duckdb_extension_postgres_scanner', 'postgres_scanner')))}")

    def open(self) -> Lake:
        """Attach (creating the lake and its tables where missing)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.catalog == "sqlite":
            # WAL: in SQLite's default rollback journal an idle reader's connection makes the writer's COMMIT fail
            # ("database is locked", measured); in WAL mode readers and the one writer go on together.
            with closing(sqlite3.connect(self.root / "lake.sqlite")) as db:
                db.execute("PRAGMA journal_mode=WAL")
        con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
        try:
            self._load(con)
            options = [f"DATA_PATH {_lit(str(self.data_path) + os.sep)}"]
            if self.inline_rows is not None:
                options.append(f"DATA_INLINING_ROW_LIMIT {int(self.inline_rows)}")
            con.execute(f"ATTACH {_lit(self.uri)} AS {self.ALIAS} ({', '.join(options)})")
            existing = {
                r[0]
                for r in con.execute(
                    "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [self.ALIAS]
                ).fetchall()
            }
            missing = [t for t in LAKE_SCHEMAS if stored_name(t) not in existing]
            if missing:
                con.execute("BEGIN")
                for table in missing:
                    cols = ", ".join(f"{_q(n)} {t}" for n, t in lake_columns(table))
                    con.execute(f"CREATE TABLE {self.ALIAS}.{_q(stored_name(table))} ({cols})")
                con.execute("COMMIT")
        except BaseException:
            con.close()
            raise
        self.con = con
        return self

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None

    def __enter__(self) -> Lake:
        return self.open() if self.con is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------------------------
    @contextmanager
    def transaction(self, run_id: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """One DuckLake transaction: everything inside becomes one snapshot (tagged with ``run_id``) or nothing."""
        con = self.con
        assert con is not None, "open() the lake first"
        con.execute("BEGIN")
        try:
            yield con
            con.execute(
                f"CALL {self.ALIAS}.set_commit_message('gradsift', $msg, extra_info => $info)",
                {"msg": f"run {run_id}", "info": json.dumps({"run_id": run_id})},
            )
            con.execute("COMMIT")
        except BaseException:
            with suppress(duckdb.TransactionException):  # a failed COMMIT has already rolled back
                con.execute("ROLLBACK")
            raise

    def commit_run(
        self, run_id: str, tables: dict[str, pa.Table], run: dict | None = None, score_key: str | None = None
    ) -> dict[str, int]:
        """Write one run's tables and its ``runs`` row in ONE transaction; returns rows written per table.

        Tables stored once per key insert only rows whose natural key is new (and each key once if the batch
        repeats it); scoring tables get ``score_key`` (required when one is given). ``run``: the runs row (missing
        columns null; ``run_id`` and ``rows_written`` filled in)."""
        for table in tables:
            if table not in LAKE_SCHEMAS or table == "runs":
                raise ValueError(f"not a lake results table: {table!r}")
        if score_key is None and any(t in SCORE_TABLES for t in tables):
            raise ValueError("scores, layer_stats and features need the run's score_key")
        written: dict[str, int] = {}
        with self.transaction(run_id) as con:
            for i, (table, data) in enumerate(tables.items()):
                written[table] = self._insert(con, f"_gradsift_new_{i}", run_id, table, data, score_key)
            row = {**(run or {}), "run_id": run_id, "rows_written": sum(written.values())}
            runs = pa.Table.from_pylist([{f.name: row.get(f.name) for f in TABLES["runs"]}], schema=TABLES["runs"])
            con.register("_gradsift_run", runs)
            try:
                con.execute(f"INSERT INTO {self.ALIAS}.runs BY NAME SELECT * FROM _gradsift_run")
            finally:
                con.unregister("_gradsift_run")
        return written

    def _insert(self, con, name: str, run_id: str, table: str, data: pa.Table, score_key: str | None) -> int:
        con.register(name, _arrow_for_duckdb(data))
        try:
            extra = [f"{_lit(run_id)} AS run_id"]
            if table in SCORE_TABLES:
                extra.append(f"{_lit(score_key)} AS score_key")
            known = [n for n, _ in lake_columns(table) if n not in ("run_id", "score_key")]
            unknown = sorted(set(data.column_names) - set(known))
            if unknown:
                raise ValueError(f"{table}: columns not in its schema: {unknown}")
            missing_key = [k for k in NATURAL_KEYS.get(table, ()) if k != "score_key" and k not in data.column_names]
            if missing_key:
                raise ValueError(f"{table}: rows need their key columns, missing: {missing_key}")
            cols = [c for c in known if c in data.column_names]  # the rest are null (INSERT ... BY NAME)
            select = f"SELECT {', '.join(extra)}, {', '.join(_q(c) for c in cols)} FROM {name}"
            target = f"{self.ALIAS}.{_q(stored_name(table))}"
            if table in NATURAL_KEYS:
                key = NATURAL_KEYS[table]
                on = " AND ".join(f"o.{_q(k)} IS NOT DISTINCT FROM n.{_q(k)}" for k in key)
                select = (
                    f"SELECT * FROM ({select}) n QUALIFY row_number() OVER (PARTITION BY "
                    f"{', '.join('n.' + _q(k) for k in key)}) = 1"
                )
                select = f"SELECT n.* FROM ({select}) n ANTI JOIN {target} o ON {on}"
            (count,) = con.execute(f"INSERT INTO {target} BY NAME {select}").fetchone()
            return int(count)
        finally:
            con.unregister(name)

    # -- maintenance ---------------------------------------------------------------------------------------------
    def compact(self, older_than: str | None = None) -> None:
        """Merge small data files, flush inlined rows; with ``older_than`` (e.g. '30 days'), also expire snapshots
        older than that and delete the files only they used (time travel to them then stops working)."""
        con = self.con
        assert con is not None
        con.execute(f"CALL ducklake_flush_inlined_data({_lit(self.ALIAS)})")
        con.execute(f"CALL ducklake_merge_adjacent_files({_lit(self.ALIAS)})")
        if older_than is not None:
            con.execute(
                f"CALL ducklake_expire_snapshots({_lit(self.ALIAS)}, older_than => now() - INTERVAL {_lit(older_than)})"
            )
        con.execute(f"CALL ducklake_cleanup_old_files({_lit(self.ALIAS)}, cleanup_all => true)")

    def snapshots(self) -> list[tuple[int, str | None]]:
        """(snapshot_id, run_id) of every snapshot, oldest first (run_id None: not a gradsift commit)."""
        assert self.con is not None
        rows = self.con.execute(
            f"SELECT snapshot_id, commit_extra_info FROM {self.ALIAS}.snapshots() ORDER BY snapshot_id"
        ).fetchall()
        return [(sid, json.loads(info)["run_id"] if info else None) for sid, info in rows]


def run_snapshots_sql(alias: str = Lake.ALIAS) -> str:
    """run_id -> the snapshot its commit made (run ids are content hashes: only snapshots order runs in time)."""
    return (
        "SELECT json_extract_string(commit_extra_info, '$.run_id') AS run_id, max(snapshot_id) AS snapshot_id "
        f"FROM {alias}.snapshots() WHERE commit_extra_info IS NOT NULL GROUP BY ALL"
    )


def current_view_sql(table: str, alias: str = Lake.ALIAS, version: int | None = None) -> str:
    """The SELECT behind a user-facing view: the current state (or the state at snapshot ``version``)."""
    at = "" if version is None else f" AT (VERSION => {int(version)})"
    src = f"(SELECT * FROM {alias}.{_q(stored_name(table))}{at})"  # `t AT (...) AS x` does not parse in 1.5.5
    if table == "runs":
        return f"SELECT r.*, s.snapshot_id FROM {src} AS r LEFT JOIN ({run_snapshots_sql(alias)}) AS s USING (run_id)"
    if table_mode(table) == "once":
        return f"SELECT * FROM {src}"
    group = CURRENT_GROUPS.get(table, ())
    partition = f"PARTITION BY {', '.join(_q(g) for g in group)}" if group else ""
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
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "python_enable_replacements": False,
        },
    )
    try:
        lake._load(con)
        con.execute(f"ATTACH {_lit(lake.uri)} AS {Lake.ALIAS} (READ_ONLY)")
        for table in LAKE_SCHEMAS:
            con.execute(f"CREATE TEMP VIEW {_q(table)} AS {current_view_sql(table)}")
            if table_mode(table) == "run":
                con.execute(
                    f"CREATE TEMP VIEW {_q(stored_name(table))} AS SELECT * FROM {Lake.ALIAS}.{_q(stored_name(table))}"
                )
        allowed = [f"{lake.data_path}{os.sep}"]
        if catalog in ("duckdb", "sqlite"):
            allowed.append(str(lake.uri.rsplit(":", 1)[1]))
        con.execute("SET allowed_directories = $dirs", {"dirs": allowed})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def query_readonly(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """One read-only SELECT on a ``connect_readonly`` connection (gradsift's statement check plus the denylist)."""
    from gradsift.storage.catalog import ReadOnlyQueryError, check_read_only

    statement = check_read_only(con, sql)
    denied = denied_functions(con, statement.query)
    if denied:
        raise ReadOnlyQueryError(f"gradsift query does not run lake maintenance or logging functions: {denied}")
    return con.sql(statement.query).to_arrow_table()
