"""The store: a DuckLake of every run's tables (storage.lake), staging per run, artifacts, resume.

Layout under the store root::

    lake.sqlite, lake_data/         the DuckLake: catalog (SQLite in WAL mode) and Parquet data files
    lake.json                       optional: a team store's catalog (PostgreSQL DSN) and shared data path
    manifests/<run_id>/, reports/<run_id>/   a run's artifacts (files), there once the run commits
    staging/<run_id>/               a run in progress:
        <table>/<part>.parquet        its tables' parts, written atomically (resume skips the finished ones)
        _artifacts/<kind>/<file>      its artifacts (kind: manifests, reports)
        _stages/<stage>               completion markers (resume skips done work)
        _scratch/<name>/<part>.parquet  parts it needs only while it runs; never committed

A run's staged parts and its ``runs`` row go into the lake in ONE transaction (``RunStaging.commit``): a crash
before it commits leaves the previous snapshot and the staging folder (the rerun resumes from the markers); after
it, the run is complete. Artifacts are moved into place after the commit (a crash between: the rerun, finding the
run completed, moves them).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from gradsift.schemas.base import Config
from gradsift.storage.atomic import (
    parquet_writer_atomic,
    remove_dir,
    replace_dir,
    write_json_atomic,
    write_parquet_atomic,
)
from gradsift.storage.lake import LOAD_CONFIG, Lake, literal, table_mode
from gradsift.storage.lake_query import create_views, shard_samples_sql

STAGES_DIR = "_stages"
"""Stage markers of a staged run (``mark_done`` / ``stage_info``); never committed."""
SCRATCH_DIR = "_scratch"
"""Parts a run reads back while it runs (e.g. per-seed training scores); never committed."""
ARTIFACTS_DIR = "_artifacts"
"""Files of a run (manifests, reports) committed to ``<store>/<kind>/<run_id>/``."""
INTERNAL_DIRS = (STAGES_DIR, SCRATCH_DIR)
ARTIFACT_KINDS = ("manifests", "reports")
SCORE_KEY = "score_key"
"""The stage marker naming the scoring key of the run's scores, layer_stats and features (default: the run id)."""

_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _table_name(table: str) -> str:
    if not _NAME.fullmatch(table):
        raise ValueError(f"table names are lower-case words ([a-z][a-z0-9_]*), got {table!r}")
    return table


def utc_now() -> datetime:
    return datetime.now(UTC)


class LakeConfig(Config):
    """Where a store keeps its DuckLake catalog and data files (``<store>/lake.json``; absent: the defaults)."""

    catalog: str = "sqlite"
    """``sqlite`` (``<store>/lake.sqlite``, WAL: one writer and many readers), ``duckdb`` (``<store>/lake.ducklake``:
    one process at a time) or, for a team store, a libpq DSN of an empty PostgreSQL database
    (``dbname=gradsift host=db user=gradsift``)."""
    data_path: str | None = None
    """The folder of the data files (shared storage every writer and reader mounts); default ``<store>/lake_data``."""
    merge_over_files: int = Field(default=16, ge=1)
    """After each run's commit, a table with more data files than this in the current snapshot has them merged
    (``Lake.merge_when_over``; one file per table per night otherwise, and a query's time grows with the files it
    opens: bench/store_growth.py). The cost is one rewrite of that table every ``merge_over_files`` nights."""


class OldLayoutError(RuntimeError):
    """A store written by gradsift's earlier layout (``tables/<table>/run_id=<id>/`` partitions, no lake)."""


class Store:
    """A store folder: its DuckLake, the staging folders of runs in progress and the runs' artifacts."""

    CONFIG = "lake.json"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.staging_root = self.root / "staging"
        path = self.root / self.CONFIG
        self.config = LakeConfig.model_validate_json(path.read_text()) if path.exists() else LakeConfig()

    def lake(self) -> Lake:
        """The store's lake (not attached yet), inlining off: each commit writes its rows as Parquet files, so
        reads do not go through the catalog database (docs/store.md, 100 nights)."""
        return Lake(self.root, self.config.catalog, inline_rows=0, data_path=self.config.data_path)

    def exists(self) -> bool:
        """Has the lake been created (a team store's catalog: a PostgreSQL database, assumed there)?"""
        if self.config.catalog in ("sqlite", "duckdb"):
            return Path(self.lake().uri.rsplit(":", 1)[1]).exists()
        return (self.root / self.CONFIG).exists()

    def check_layout(self) -> None:
        """Refuse a store of the earlier hard-linked Parquet layout, saying how to move on."""
        if (self.root / "tables").is_dir() and not self.exists():
            raise OldLayoutError(
                f"{self.root} was written by an earlier gradsift (tables/<table>/run_id=<id>/ Parquet partitions); "
                "this version keeps results in a DuckLake (lake.sqlite + lake_data/). Rerun your ingest/score "
                f"commands with a new --store (their inputs are all they need), or move {self.root / 'tables'} "
                "aside to start this store afresh"
            )

    def check_catalog(self) -> None:
        """Refuse a lake whose catalog file is gone while its data files are there (deleted by hand)."""
        if not self.exists() and any(self.lake().data_path.glob("**/*.parquet")):
            raise FileNotFoundError(
                f"{self.root}: the lake's catalog {self.lake().uri} is missing but its data files are there; the "
                "catalog is the store's history (which file holds which rows of which snapshot) and cannot be rebuilt "
                "from the files: restore it from a backup, or move the store aside and rerun the commands"
            )

    def ensure(self) -> Store:
        """The store's folders and its lake with every table (created once, under a file lock)."""
        self.check_layout()
        self.staging_root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lake-init.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self.check_catalog()
            if not (self.root / ".lake-ready").exists() or not self.exists():
                self.lake().open().close()
                (self.root / ".lake-ready").touch()
        return self

    # ----- reading (gradsift's own reads; user SQL goes through storage.catalog.query) -----------------------------
    def reader(self) -> duckdb.DuckDBPyConnection:
        """A locked-down connection over the lake (``locked_down``: attached READ_ONLY, the current views, files only
        under the lake's data path and catalog file, settings locked); close it after use.

        With a SQLite or PostgreSQL catalog it is a cursor of one such instance per process and store, made once:
        loading the extensions verifies their signatures (seconds on a loaded machine) and the views bind against
        the catalog. Each statement still reads the latest committed snapshot. A DuckDB-file catalog locks out every
        other attach, so its reader is an instance of its own, closed with it."""
        lake = self.lake()
        if self.config.catalog == "duckdb":
            return _lake_instance(lake)
        key = (lake.uri, str(lake.data_path))
        with _SHARED_LOCK:
            if key not in _SHARED:
                _SHARED[key] = _lake_instance(lake)
            return _SHARED[key].cursor()

    def read(self, sql: str, params: list | dict | None = None) -> pa.Table:
        """One query over the current views (gradsift's own SQL; values bound as ``params``)."""
        if not self.exists():
            self.check_layout()
            self.check_catalog()
            raise FileNotFoundError(f"no store at {self.root}: run a flow first (gradsift demo / score / nightly)")
        with closing(self.reader()) as con:
            return con.execute(sql, params).to_arrow_table()

    def read_run(self, run_id: str) -> dict | None:
        """The latest outcome of run ``run_id`` (its ``runs`` row), None if it never completed or failed."""
        if not self.exists():
            return None
        rows = self.read("SELECT * FROM runs WHERE run_id = ?", [run_id]).to_pylist()
        return rows[0] if rows else None

    def runs(self) -> list[dict]:
        return self.read("SELECT * FROM runs ORDER BY snapshot_id").to_pylist() if self.exists() else []

    def run_table(self, table: str, run_id: str) -> pa.Table:
        """The rows of ``table`` that run ``run_id`` committed; for ``samples``, every sample of the shards it
        ingested (stored once, by whichever run first ingested each)."""
        if table == "samples":
            shards = (
                "(SELECT flatten(list(CAST(json_extract(entry, '$.shards') AS VARCHAR[]))) FROM ingests_history "
                "WHERE run_id = $run)"
            )
            return self.read(shard_samples_sql(shards), {"run": run_id})
        if table_mode(table) != "run":
            raise ValueError(f"{table} is stored once per key, not per run: query it by its key")
        return self.read(f"SELECT * EXCLUDE (run_id) FROM {_table_name(table)}_history WHERE run_id = ?", [run_id])

    # ----- runs and artifacts -----------------------------------------------------------------
    def staging(self, run_id: str) -> RunStaging:
        return RunStaging(self, run_id)

    def artifact_dir(self, kind: str, run_id: str) -> Path:
        """Where a committed run's ``kind`` files are (``ARTIFACT_KINDS``): ``<store>/<kind>/<run_id>/``."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind must be one of {ARTIFACT_KINDS}, got {kind!r}")
        return self.root / kind / run_id


_SHARED: dict[tuple[str, str], duckdb.DuckDBPyConnection] = {}
_SHARED_LOCK = threading.Lock()


def _lake_instance(lake: Lake) -> duckdb.DuckDBPyConnection:
    def attach(con: duckdb.DuckDBPyConnection) -> None:
        lake._load(con)
        con.execute(f"ATTACH {literal(lake.uri)} AS {Lake.ALIAS} (READ_ONLY)")
        create_views(con)

    allowed = [f"{lake.data_path}{os.sep}"]
    if lake.catalog in ("duckdb", "sqlite"):
        allowed.append(lake.uri.rsplit(":", 1)[1])
    return locked_down(attach, allowed)


def locked_down(attach, allowed: list[str]) -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB with no extension autoinstall/autoload and no Python replacement scans; after
    ``attach(con)`` it may read files only under ``allowed``, reaches nothing else and its settings are locked.
    ``allowed_directories`` can only be set on a started database and before external access is off, so it and the
    two after it are SETs; the rest are connect-time config."""
    con = duckdb.connect(
        ":memory:", config={**LOAD_CONFIG, "autoload_known_extensions": False, "python_enable_replacements": False}
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


class Parts:
    """Parquet parts under ``root/<table>/<part>.parquet``."""

    def __init__(self, root: Path):
        self.root = root

    def part_path(self, table: str, part: str) -> Path:
        return self.root / _table_name(table) / f"{part}.parquet"

    def has_part(self, table: str, part: str) -> bool:
        return self.part_path(table, part).exists()

    def write_part(self, table: str, part: str, data: pa.Table) -> Path:
        return write_parquet_atomic(data, self.part_path(table, part))

    def part_writer(self, table: str, part: str, schema: pa.Schema):
        """``with parts.part_writer(table, part, schema) as write: write(rows) ...``: a part written a batch at a
        time (storage.atomic.parquet_writer_atomic); it is there, whole, once the block ends."""
        return parquet_writer_atomic(self.part_path(table, part), schema)

    def parts(self, table: str) -> list[Path]:
        return sorted((self.root / _table_name(table)).glob("*.parquet"))

    def clear(self, table: str) -> None:
        """Remove every part of ``table`` (a stage that reruns from scratch: no part of the attempt before stays)."""
        remove_dir(self.root / _table_name(table))

    def count_rows(self, table: str, part: str | None = None) -> int:
        """Rows of one part, or of every part of ``table``, from the Parquet footers."""
        paths = [self.part_path(table, part)] if part is not None else self.parts(table)
        return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)

    def read(self, table: str) -> pa.Table | None:
        parts = self.parts(table)
        if not parts:
            return None
        return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")


class RunStaging(Parts):
    """The staging folder of one run: table parts, artifacts, stage markers, scratch parts, and the commit.

    ``write_part`` / ``parts`` / ``read`` are the run's tables (committed); ``scratch`` has the same
    methods for parts that are not; ``artifact_path`` is where a run writes its files.
    """

    def __init__(self, store: Store, run_id: str):
        super().__init__(store.staging_root / run_id)
        self.store = store
        self.run_id = run_id
        self.dir = self.root
        self.scratch = Parts(self.dir / SCRATCH_DIR)
        self.merged: list[str] = []
        """Tables whose data files ``commit`` merged after the run's transaction (``LakeConfig.merge_over_files``)."""

    # ----- artifacts --------------------------------------------------------------------------
    def artifact_dir(self, kind: str) -> Path:
        """Where this run stages its ``kind`` files (moved to ``store.artifact_dir(kind, run_id)`` on commit)."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind must be one of {ARTIFACT_KINDS}, got {kind!r}")
        return self.dir / ARTIFACTS_DIR / kind

    def artifact_path(self, kind: str, name: str) -> Path:
        """A staged artifact file (its folder is created); ``final_artifact_path`` is where it will be."""
        folder = self.artifact_dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def final_artifact_path(self, kind: str, name: str = "") -> Path:
        """Where the staged ``kind`` artifact ``name`` is once the run has committed."""
        self.artifact_dir(kind)  # checks the kind
        folder = self.store.artifact_dir(kind, self.run_id)
        return folder / name if name else folder

    # ----- stage markers (resume) -------------------------------------------------------------
    def mark_done(self, stage: str, info: dict | None = None) -> None:
        write_json_atomic(info or {}, self.dir / STAGES_DIR / stage)

    def stage_info(self, stage: str) -> dict | None:
        marker = self.dir / STAGES_DIR / stage
        return json.loads(marker.read_text()) if marker.exists() else None

    def set_score_key(self, key: str) -> None:
        """The scoring key this run's scores, layer_stats and features are stored under (flows.incremental)."""
        self.mark_done(SCORE_KEY, {"key": key})

    # ----- commit -----------------------------------------------------------------------------
    def staged(self) -> tuple[list[str], list[str]]:
        """(tables, artifact kinds) staged now. Anything in the folder that is neither a table, an artifact
        kind nor one of the internal folders (``_stages``, ``_scratch``) is an error, not skipped."""
        tables, kinds = [], []
        if not self.dir.exists():
            return tables, kinds
        for entry in sorted(self.dir.iterdir()):
            if entry.name in INTERNAL_DIRS and entry.is_dir():
                continue
            if entry.name == ARTIFACTS_DIR and entry.is_dir():
                for kind in sorted(entry.iterdir()):
                    if kind.name not in ARTIFACT_KINDS or not kind.is_dir():
                        raise ValueError(f"{kind}: not an artifact kind ({', '.join(ARTIFACT_KINDS)})")
                    kinds.append(kind.name)
            elif entry.is_dir() and _NAME.fullmatch(entry.name):
                tables.append(entry.name)
            else:
                raise ValueError(
                    f"{entry}: a staged run holds table folders, {ARTIFACTS_DIR}/ and {', '.join(INTERNAL_DIRS)}/ "
                    f"only (left by another gradsift version? remove {self.dir} and rerun)"
                )
        return tables, kinds

    def commit(self, run: dict) -> int:
        """Write every staged table and the ``runs`` row ``run`` into the lake in one transaction (rows stored once
        per key that the lake has already are skipped); returns the rows written. Then merges the files of tables
        over ``LakeConfig.merge_over_files`` (``merged``), each in its own transaction. ``finish`` then moves the
        artifacts into place."""
        tables, _ = self.staged()
        parts = {table: self.parts(table) for table in tables}
        key = (self.stage_info(SCORE_KEY) or {}).get("key")
        tables = {t: p for t, p in parts.items() if p}
        with self.store.lake() as lake:
            written = lake.commit_run(self.run_id, tables, run={**run, "score_key": key}, score_key=key or self.run_id)
            try:
                self.merged = lake.merge_when_over(self.store.config.merge_over_files)
            except duckdb.Error as e:  # the run is committed either way; the next commit merges
                logging.getLogger(__name__).warning("merging the lake's data files failed (next commit retries): %s", e)
        return sum(written.values())

    def finish(self) -> None:
        """After the commit: move the staged artifacts to ``<store>/<kind>/<run_id>/``, remove the staging folder
        (also what a crash right after the commit left: the rerun of a completed run calls this)."""
        for kind in self.staged()[1]:
            replace_dir(self.artifact_dir(kind), self.final_artifact_path(kind))
        self.remove()

    def remove(self) -> None:
        """Delete the staging folder (after a commit, or to discard the run's staged work)."""
        remove_dir(self.dir)
