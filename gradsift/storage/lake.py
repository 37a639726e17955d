"""The DuckLake store: every run's tables and its ``runs`` row written in one transaction (docs/store.md).

Needs duckdb 1.5.x with the ``duckdb-extension-ducklake`` wheel of the same version (offline from PyPI); the
duckdb 2.0 wheels have no ducklake extension and ``INSTALL`` needs the network. ``ducklake_extension()`` finds the
extension file; ``LakeUnavailable`` says why when it cannot.

Layout under ``root`` (``storage.store.Store`` picks the catalog; the embedded default is SQLite in WAL mode)::

    lake.sqlite        the catalog (``catalog="duckdb"`` -> lake.ducklake, or a PostgreSQL DSN for a team store)
    lake_data/         Parquet data files, written and removed only by DuckLake (``data_path``: shared storage)

Tables (``table_mode``):

* ``once``: samples, shard_members, scores, layer_stats, features. One row per natural key (``NATURAL_KEYS``, the
  scoring key ``score_key`` = hash of model, weights, checkpoint, score config and code first); ``commit_run`` skips
  rows whose key is already stored, so a nightly run over unchanged data adds a snapshot and no rows. ``run_id``
  is the run that first computed the row. Earlier states: time travel (``AT (VERSION => n)``).
* ``run``: every other derived table, stored as ``<table>_history`` with ``run_id``; the ``<table>`` view is the
  latest run's rows per ``CURRENT_GROUPS`` group (e.g. per selection), latest by commit snapshot (run ids are
  hashes, not times).
* ``runs``: one row per run outcome, appended in the same transaction as its results; the commit's snapshot
  records the run id (``commit_extra_info``); the ``runs`` view shows the snapshot that inserted each row.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from gradsift.schemas.tables import TABLES

NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "samples": ("dataset", "sample_id"),
    "shard_members": ("dataset", "shard", "sample_id"),
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

INGESTS = pa.schema([("ingest_key", pa.string()), ("dataset", pa.string()), ("entry", pa.string())])
"""Which samples shards a source's ingest made (``entry``: JSON, flows.incremental), one row per run that used it."""

SHARD_MEMBERS = pa.schema(
    [("dataset", pa.string()), ("shard", pa.string()), ("sample_id", pa.string()), ("position", pa.int32())]
)
"""Which samples a shard holds, in order (``position``), once per shard: a shard's name hashes its sample ids, so
the rows of a name never change. Ingest reuse and ``Store.run_table`` find a shard's samples through it by
``(dataset, sample_id)``, wherever the sample was first stored (flows.incremental)."""

CAPTURE_FEATURES = pa.schema([("step", pa.int64()), ("rank", pa.int32()), *FEATURES_SCHEMA])
"""Features recorded during a captured training run (schemas.tables.capture_features_schema, as ``FLOAT[]``)."""

LAKE_SCHEMAS: dict[str, pa.Schema] = {
    **TABLES,
    "features": FEATURES_SCHEMA,
    "ingests": INGESTS,
    "shard_members": SHARD_MEMBERS,
    "capture_features": CAPTURE_FEATURES,
}

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


def table_mode(table: str) -> str:
    if table == "runs":
        return "runs"
    return "once" if table in NATURAL_KEYS else "run"


def stored_name(table: str) -> str:
    """The lake table behind a view name: ``<table>_history`` for per-run tables, else the name itself."""
    return f"{table}_history" if table_mode(table) == "run" else table


LOAD_CONFIG = {"autoinstall_known_extensions": False, "allow_unsigned_extensions": True}
"""Connect-time config of every connection that loads the lake's extensions. They are loaded only by gradsift, from
the files of the pinned PyPI wheels (``ducklake_extension``); verifying their signatures costs 1-3 s per connection
on a loaded 2-core machine (measured: 2.1-2.8 s against 0.01 s), paid by every run's commit and every reader. User
SQL never loads anything: ``gradsift query`` refuses LOAD by statement type and its settings are locked."""
WRITER_CONFIG = {"enable_external_file_cache": False}
"""The writer's DuckDB settings beyond ``LOAD_CONFIG``. DuckDB 1.3+ caches the bytes of every Parquet file it reads
in its buffer pool, evicted only past ``memory_limit`` (80% of RAM); a commit reads each staged part once and the
lake's files for its ANTI JOINs, so the cache grew with the run: 417 MB after a 1M-row commit's 120 inserts, against
a flat 230 MB without it (bench/RESULTS.md). Readers keep the cache (they read the same files again)."""
ROW_GROUP_ROWS = 16_384
"""Rows per row group of the lake's Parquet files (DuckLake option ``parquet_row_group_size``, default 122,880). A
merge (``merge_when_over``) holds a row group per thread while it rewrites a table: measured on a 1M-row samples
table, 545 MB over the connection's base at the default, about 140 MB at 16,384 (8,192: 300 MB)."""


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


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


Rows = pa.Table | list[Path]
"""A table's rows to commit: in memory, or the Parquet files that hold them."""


INSERT_BYTES = 32 << 20
"""Uncompressed bytes of staged Parquet parts (from their footers) per INSERT of a commit. An INSERT holds its
batch in memory (the de-duplicating window), and DuckDB builds its ANTI JOIN on the batch and scans the table's keys
once per INSERT (which sees the transaction's earlier batches, so a key stays once across batches): so a commit's
memory follows this bound, not the run, and its scans of the table follow the run's bytes / this bound. Each INSERT
writes one data file. 1M ingested rows (420 MB): 14 INSERTs at 32 MB, against 120 of 32 parts each before, whose
table scans made the commit's time grow with the square of the run (bench/RESULTS.md)."""


def _uncompressed_bytes(path: Path) -> int:
    meta = pq.read_metadata(path)
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def _batches(data: Rows) -> list[Rows]:
    """``data`` as the INSERTs a commit makes: an Arrow table whole, Parquet files up to ``INSERT_BYTES`` at a time
    (a file larger than that alone)."""
    if isinstance(data, pa.Table):
        return [data]
    batches: list[Rows] = [[]]
    size = 0
    for path in data:
        nbytes = _uncompressed_bytes(path)
        if batches[-1] and size + nbytes > INSERT_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += nbytes
    return batches


class Lake:
    """One attached DuckLake (the writer's handle; readers use ``connect_readonly``)."""

    ALIAS = "lake"

    def __init__(
        self,
        root: Path | str,
        catalog: str = "duckdb",
        inline_rows: int | None = None,
        data_path: Path | str | None = None,
    ):
        self.root = Path(root).resolve()
        self.catalog = catalog
        self.data_path = Path(data_path).resolve() if data_path is not None else self.root / "lake_data"
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
        con.execute(f"LOAD {literal(str(ducklake_extension()))}")
        if self.catalog == "sqlite":
            con.execute(f"LOAD {literal(str(_extension('duckdb_extension_sqlite_scanner', 'sqlite_scanner')))}")
        elif self.catalog != "duckdb":
            con.execute(f"LOAD {literal(str(_extension('duckdb_extension_postgres_scanner', 'postgres_scanner')))}")

    def open(self) -> Lake:
        """Attach (creating the lake and its tables where missing)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.catalog == "sqlite":
            # WAL: in SQLite's default rollback journal an idle reader's connection makes the writer's COMMIT fail
            # ("database is locked", measured); in WAL mode readers and the one writer go on together.
            with closing(sqlite3.connect(self.root / "lake.sqlite")) as db:
                db.execute("PRAGMA journal_mode=WAL")
        con = duckdb.connect(":memory:", config=LOAD_CONFIG | WRITER_CONFIG)
        try:
            self._load(con)
            options = [f"DATA_PATH {literal(str(self.data_path) + os.sep)}"]
            if self.inline_rows is not None:
                options.append(f"DATA_INLINING_ROW_LIMIT {int(self.inline_rows)}")
            con.execute(f"ATTACH {literal(self.uri)} AS {self.ALIAS} ({', '.join(options)})")
            row_group = con.execute(
                f"SELECT value FROM {self.ALIAS}.options() WHERE option_name = 'parquet_row_group_size'"
            ).fetchall()
            if row_group != [(str(ROW_GROUP_ROWS),)]:  # a catalog option: set once per lake (no snapshot)
                con.execute(f"CALL {self.ALIAS}.set_option('parquet_row_group_size', {ROW_GROUP_ROWS})")
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
                    cols = ", ".join(f"{ident(n)} {t}" for n, t in lake_columns(table))
                    con.execute(f"CREATE TABLE {self.ALIAS}.{ident(stored_name(table))} ({cols})")
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
        self, run_id: str, tables: dict[str, Rows], run: dict | None = None, score_key: str | None = None
    ) -> dict[str, int]:
        """Write one run's tables and its ``runs`` row in ONE transaction; returns rows written per table.

        ``tables``: each table's rows, an Arrow table or its Parquet files (read by DuckDB, never all in memory).
        Tables stored once per key insert only rows whose natural key is new (and each key once if the batch
        repeats it); scoring tables get ``score_key`` (required when one is given). ``run``: the runs row (missing
        columns null; ``run_id``, ``rows_written`` filled in, ``status`` completed and ``finished_at`` now unless given:
        the views order runs by ``finished_at``)."""
        with self.transaction(run_id) as con:
            written = self._write(con, run_id, tables, score_key)
            row = {
                "status": "completed",
                "finished_at": datetime.now(UTC),
                **(run or {}),
                "run_id": run_id,
                "rows_written": sum(written.values()),
            }
            runs = pa.Table.from_pylist([{f.name: row.get(f.name) for f in TABLES["runs"]}], schema=TABLES["runs"])
            con.register("_gradsift_run", runs)
            try:
                con.execute(f"INSERT INTO {self.ALIAS}.runs BY NAME SELECT * FROM _gradsift_run")
            finally:
                con.unregister("_gradsift_run")
        return written

    def commit_shard(self, run_id: str, tables: dict[str, Rows], score_key: str | None = None) -> dict[str, int]:
        """One worker's shard of run ``run_id`` in one transaction, no ``runs`` row (the driver's ``commit_run``
        writes it once every shard is in). For the tables stored once per key only: a rerun shard inserts nothing
        new, so shards committed before a crash are simply kept. Workers on several machines do this against one
        PostgreSQL catalog (``docs/store.md``, team store)."""
        per_run = [t for t in tables if table_mode(t) != "once"]
        if per_run:
            raise ValueError(f"shards carry only the tables stored once per key, not {per_run}")
        with self.transaction(run_id) as con:
            return self._write(con, run_id, tables, score_key)

    def _write(self, con, run_id: str, tables: dict[str, Rows], score_key: str | None) -> dict[str, int]:
        for table in tables:
            if table not in LAKE_SCHEMAS or table == "runs":
                raise ValueError(f"not a lake results table: {table!r}")
        if score_key is None and any(t in SCORE_TABLES for t in tables):
            raise ValueError("scores, layer_stats and features need the run's score_key")
        return {
            table: sum(
                self._insert(con, f"_gradsift_new_{i}", run_id, table, part, score_key) for part in _batches(data)
            )
            for i, (table, data) in enumerate(tables.items())
        }

    def _insert(self, con, name: str, run_id: str, table: str, data: Rows, score_key: str | None) -> int:
        if isinstance(data, pa.Table):
            con.register(name, _arrow_for_duckdb(data))
            source = name
        else:  # Parquet files: DuckDB reads float16 as FLOAT and fixed-size lists as lists
            files = ", ".join(literal(str(f)) for f in data)
            source = f"read_parquet([{files}], union_by_name = true)"
        try:
            found = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()] if data else []
            extra = [f"{literal(run_id)} AS run_id"]
            if table in SCORE_TABLES:
                extra.append(f"{literal(score_key)} AS score_key")
            known = [n for n, _ in lake_columns(table) if n not in ("run_id", "score_key")]
            unknown = sorted(set(found) - set(known))
            if unknown:
                raise ValueError(f"{table}: columns not in its schema: {unknown}")
            if not found:
                return 0
            missing_key = [k for k in NATURAL_KEYS.get(table, ()) if k != "score_key" and k not in found]
            if missing_key:
                raise ValueError(f"{table}: rows need their key columns, missing: {missing_key}")
            cols = [c for c in known if c in found]  # the rest are null (INSERT ... BY NAME)
            select = f"SELECT {', '.join(extra)}, {', '.join(ident(c) for c in cols)} FROM {source}"
            target = f"{self.ALIAS}.{ident(stored_name(table))}"
            if table in NATURAL_KEYS:
                key = NATURAL_KEYS[table]
                on = " AND ".join(f"o.{ident(k)} IS NOT DISTINCT FROM n.{ident(k)}" for k in key)
                select = (
                    f"SELECT * FROM ({select}) n QUALIFY row_number() OVER (PARTITION BY "
                    f"{', '.join('n.' + ident(k) for k in key)}) = 1"
                )
                select = f"SELECT n.* FROM ({select}) n ANTI JOIN {target} o ON {on}"
            (count,) = con.execute(f"INSERT INTO {target} BY NAME {select}").fetchone()
            return int(count)
        finally:
            if isinstance(data, pa.Table):
                con.unregister(name)

    # -- maintenance ---------------------------------------------------------------------------------------------
    def compact(self, older_than: str | None = None) -> None:
        """Merge small data files, flush inlined rows; with ``older_than`` (e.g. '30 days'), also expire snapshots
        older than that and delete the files only they used (time travel to them then stops working)."""
        con = self.con
        assert con is not None
        con.execute(f"CALL ducklake_flush_inlined_data({literal(self.ALIAS)})")
        con.execute(f"CALL ducklake_merge_adjacent_files({literal(self.ALIAS)})")
        if older_than is not None:
            con.execute(
                f"CALL ducklake_expire_snapshots({literal(self.ALIAS)}, older_than => now() - INTERVAL {literal(older_than)})"
            )
        con.execute(f"CALL ducklake_cleanup_old_files({literal(self.ALIAS)}, cleanup_all => true)")

    def merge_when_over(self, max_files: int) -> list[str]:
        """Merge the data files of each table that has more than ``max_files`` of them in the current snapshot
        (``LakeConfig.merge_over_files``) and delete the files no snapshot reads any more; returns the tables
        merged. One DuckLake transaction per table: a kill leaves the table as it was or merged, readable either
        way. Time travel to earlier snapshots still works (merged files keep each row's snapshot range)."""
        con = self.con
        assert con is not None
        rows = con.execute(f"SELECT table_name, file_count FROM ducklake_table_info({literal(self.ALIAS)})").fetchall()
        merged = sorted(name for name, files in rows if files > max_files)
        for name in merged:
            con.execute(f"CALL ducklake_merge_adjacent_files({literal(self.ALIAS)}, {literal(name)})")
        if merged:
            con.execute(f"CALL ducklake_cleanup_old_files({literal(self.ALIAS)}, cleanup_all => true)")
        return merged

    def snapshots(self) -> list[tuple[int, str | None]]:
        """(snapshot_id, run_id) of every snapshot, oldest first (run_id None: not a gradsift commit)."""
        assert self.con is not None
        rows = self.con.execute(
            f"SELECT snapshot_id, commit_extra_info FROM {self.ALIAS}.snapshots() ORDER BY snapshot_id"
        ).fetchall()
        return [(sid, json.loads(info)["run_id"] if info else None) for sid, info in rows]
