"""The Parquet store: staging per run, atomic parts, whole-run commit, resume.

Layout under the store root::

    tables/runs/<run_id>.parquet                  one row per run (rewritten as its status changes)
    tables/<table>/run_id=<run_id>/<part>.parquet  derived rows, visible once the run completes
    staging/<run_id>/<table>/<part>.parquet        a run in progress; parts are written atomically
    staging/<run_id>/_stages/<stage>               completion markers (resume skips done work)
    catalog.duckdb                                 views over the tables (storage.catalog)

Every write is a temp file plus ``os.replace`` on the same filesystem; a run is moved from staging
into ``tables/`` only when all of it is written, so a crash never leaves a half-written table
visible, and rerunning the same command finds the finished parts and skips them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradsift.schemas.tables import RUNS


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path``. A failed write leaves no temp file; a full disk raises
    ``OSError(ENOSPC)`` naming ``path`` (pyarrow's and write()'s own errors name no file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "no space left on device", str(path)) from err
        raise


def write_parquet_atomic(table: pa.Table, path: Path, row_group_size: int | None = None) -> None:
    """Write ``table`` to ``path`` via a temp file and rename: readers see all of it or nothing."""
    vector_cols = [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
    _write_atomic(
        path,
        lambda tmp: pq.write_table(
            table,
            tmp,
            row_group_size=row_group_size or (1024 if vector_cols else None),
            use_dictionary=[f.name for f in table.schema if f.name not in vector_cols],
            compression="zstd",
        ),
    )


def write_json_atomic(data: dict, path: Path) -> None:
    """Write ``data`` as JSON via a temp file and rename (markers and index entries)."""
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data)))


def utc_now() -> datetime:
    return datetime.now(UTC)


class Store:
    """A store folder of Parquet tables and a DuckDB catalog."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.tables = self.root / "tables"
        self.staging_root = self.root / "staging"
        self.catalog_path = self.root / "catalog.duckdb"

    def ensure(self) -> Store:
        self.tables.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)
        return self

    # ----- runs -------------------------------------------------------------------------------
    def run_path(self, run_id: str) -> Path:
        return self.tables / "runs" / f"{run_id}.parquet"

    def read_run(self, run_id: str) -> dict | None:
        path = self.run_path(run_id)
        if not path.exists():
            return None
        return pq.read_table(path).to_pylist()[0]

    def write_run(self, row: dict) -> None:
        full = {name: row.get(name) for name in RUNS.names}
        write_parquet_atomic(pa.Table.from_pylist([full], schema=RUNS), self.run_path(row["run_id"]))

    def runs(self) -> list[dict]:
        return [pq.read_table(p).to_pylist()[0] for p in sorted((self.tables / "runs").glob("*.parquet"))]

    def staging(self, run_id: str) -> RunStaging:
        return RunStaging(self, run_id)

    def committed_parts(self, table: str, run_id: str) -> list[Path]:
        return sorted((self.tables / table / f"run_id={run_id}").glob("*.parquet"))

    def table_has_data(self, table: str) -> bool:
        return any((self.tables / table).glob("run_id=*/*.parquet"))


class RunStaging:
    """The staging folder of one run: atomic parts, stage markers, and the final commit."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.dir = store.staging_root / run_id

    def part_path(self, table: str, part: str) -> Path:
        return self.dir / table / f"{part}.parquet"

    def has_part(self, table: str, part: str) -> bool:
        return self.part_path(table, part).exists()

    def write_part(self, table: str, part: str, data: pa.Table) -> Path:
        path = self.part_path(table, part)
        write_parquet_atomic(data, path)
        return path

    def parts(self, table: str) -> list[Path]:
        return sorted((self.dir / table).glob("*.parquet"))

    def count_rows(self, table: str, part: str | None = None) -> int:
        """Rows of one staged part, or of every part of ``table``, from the Parquet footers."""
        paths = [self.part_path(table, part)] if part is not None else self.parts(table)
        return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)

    def read(self, table: str) -> pa.Table | None:
        parts = self.parts(table)
        if not parts:
            return None
        return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")

    # ----- stage markers (resume) -------------------------------------------------------------
    def mark_done(self, stage: str, info: dict | None = None) -> None:
        write_json_atomic(info or {}, self.dir / "_stages" / stage)

    def stage_info(self, stage: str) -> dict | None:
        marker = self.dir / "_stages" / stage
        return json.loads(marker.read_text()) if marker.exists() else None

    # ----- commit -----------------------------------------------------------------------------
    def commit(self) -> int:
        """Move every staged table into ``tables/<table>/run_id=<run_id>``; returns rows moved.

        Idempotent: a crash part-way is finished by calling it again (the marker says so).
        """
        self.mark_done("committing")
        rows = 0
        for table_dir in sorted(p for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith("_")):
            dest = self.store.tables / table_dir.name / f"run_id={self.run_id}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            rows += self.count_rows(table_dir.name)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(table_dir, dest)
        shutil.rmtree(self.dir, ignore_errors=True)
        return rows
