"""The Parquet store: staging per run, atomic parts, whole-run commit, resume.

Layout under the store root::

    tables/runs/<run_id>.parquet                  one row per run (rewritten as its status changes)
    tables/<table>/run_id=<run_id>/<part>.parquet  derived rows, visible once the run completes
    manifests/<run_id>/, reports/<run_id>/         a run's artifacts (files), there once the run commits
    staging/<run_id>/                              a run in progress:
        <table>/<part>.parquet                       its tables; parts are written atomically
        _artifacts/<kind>/<file>                     its artifacts (kind: manifests, reports)
        _stages/<stage>                              completion markers (resume skips done work)
        _scratch/<name>/<part>.parquet               parts it needs only while it runs; never committed
    catalog.duckdb                                 views over the tables (storage.catalog)

Every write goes through ``storage.atomic`` (a temp file renamed into place); a run is moved from
staging into ``tables/``, ``manifests/`` and ``reports/`` only when all of it is written, so a crash never
leaves a half-written table or an artifact of an uncommitted run visible, and rerunning the same command
finds the finished parts and skips them. The commit first records what it will move (the ``committing``
marker); a commit cut short is finished by the next ``commit`` of that run (``RunRecorder`` does so
before rerunning anything).
"""

from __future__ import annotations

import glob
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradsift.schemas.tables import RUNS
from gradsift.storage.atomic import (
    link_atomic,
    parquet_writer_atomic,
    remove_dir,
    replace_dir,
    write_json_atomic,
    write_parquet_atomic,
)

STAGES_DIR = "_stages"
"""Stage markers of a staged run (``mark_done`` / ``stage_info``); never committed."""
SCRATCH_DIR = "_scratch"
"""Parts a run reads back while it runs (e.g. per-seed training scores); never committed."""
ARTIFACTS_DIR = "_artifacts"
"""Files of a run (manifests, reports) committed to ``<store>/<kind>/<run_id>/``."""
INTERNAL_DIRS = (STAGES_DIR, SCRATCH_DIR)
ARTIFACT_KINDS = ("manifests", "reports")
COMMITTING = "committing"
"""The stage marker a commit writes before it moves anything: what it moves, with each table's rows."""

_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _table_name(table: str) -> str:
    if not _NAME.fullmatch(table):
        raise ValueError(f"table names are lower-case words ([a-z][a-z0-9_]*), got {table!r}")
    return table


def _jsonable(value):
    """``value`` as JSON would give it back (a value JSON has no type for as its ``str``; such keys dropped)."""
    return json.loads(json.dumps(value, default=str, skipkeys=True))


def utc_now() -> datetime:
    return datetime.now(UTC)


def _read_row(path: Path) -> dict:
    """A run row: its file read in one go, so that a writer replacing it (temp file + rename) mid-read cannot
    mix two versions (pyarrow opens a path once for the footer and again for the data)."""
    return pq.read_table(pa.BufferReader(path.read_bytes())).to_pylist()[0]


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
        try:
            return _read_row(path)
        except FileNotFoundError:
            return None

    def write_run(self, row: dict) -> None:
        full = {name: row.get(name) for name in RUNS.names}
        write_parquet_atomic(pa.Table.from_pylist([full], schema=RUNS), self.run_path(row["run_id"]))

    def runs(self) -> list[dict]:
        return [_read_row(p) for p in sorted((self.tables / "runs").glob("*.parquet"))]

    def staging(self, run_id: str) -> RunStaging:
        return RunStaging(self, run_id)

    def artifact_dir(self, kind: str, run_id: str) -> Path:
        """Where a committed run's ``kind`` files are (``ARTIFACT_KINDS``): ``<store>/<kind>/<run_id>/``."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind must be one of {ARTIFACT_KINDS}, got {kind!r}")
        return self.root / kind / run_id

    def committed_parts(self, table: str, run_id: str) -> list[Path]:
        return sorted((self.tables / table / f"run_id={run_id}").glob("*.parquet"))

    def table_has_data(self, table: str) -> bool:
        return any((self.tables / table).glob("run_id=*/*.parquet"))


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

    def pending_commit(self) -> dict | None:
        """The plan of a commit that began and did not finish (the ``committing`` marker), else None."""
        return self.stage_info(COMMITTING)

    def prepare_commit(self, result: dict | None = None) -> dict:
        """Record what the commit moves before it moves anything: the ``committing`` marker.

        The plan: ``tables`` {table: rows}, ``artifacts`` [kind], ``result`` (the run's result, JSON)."""
        prior = self.pending_commit() or {"tables": {}, "artifacts": [], "result": None}
        tables, kinds = self.staged()
        plan = {
            "tables": prior["tables"] | {t: self.count_rows(t) for t in tables},  # moved ones keep their count
            "artifacts": sorted(set(prior["artifacts"]) | set(kinds)),
            "result": _jsonable(result) if result is not None else prior["result"],
        }
        self.mark_done(COMMITTING, plan)
        return plan

    def commit_table(self, table: str) -> None:
        """Move one staged table into ``tables/<table>/run_id=<run_id>`` (done already: nothing to do)."""
        src, dest = self.dir / table, self.store.tables / table / f"run_id={self.run_id}"
        if src.exists():
            replace_dir(src, dest)
        elif not dest.exists():
            raise FileNotFoundError(f"commit of run {self.run_id}: table {table} is neither in {self.dir} nor {dest}")

    def commit_artifacts(self, kind: str) -> None:
        """Move the staged ``kind`` files to ``<store>/<kind>/<run_id>/`` (done already: nothing to do)."""
        src, dest = self.artifact_dir(kind), self.final_artifact_path(kind)
        if src.exists():
            replace_dir(src, dest)
        elif not dest.exists():
            raise FileNotFoundError(f"commit of run {self.run_id}: {kind} are neither in {src} nor {dest}")

    def commit(self, result: dict | None = None, remove: bool = True) -> int:
        """Move every staged table into ``tables/<table>/run_id=<run_id>`` and every artifact kind into
        ``<store>/<kind>/<run_id>/``; returns the rows of the run's tables.

        Writes the ``committing`` marker first; a commit cut short (the marker is there) is finished by calling
        this again, moving what is left and counting what was moved. ``remove``: delete the staging folder
        (markers, scratch) at the end; ``RunRecorder`` removes it itself once the run row says completed.
        """
        plan = self.prepare_commit(result)
        for table in plan["tables"]:
            self.commit_table(table)
        for kind in plan["artifacts"]:
            self.commit_artifacts(kind)
        if remove:
            self.remove()
        return sum(plan["tables"].values())

    def restage_committed(self, broken: list[Path]) -> int:
        """Link this run's committed parts back into its staging folder (to redo a completed run), but for any
        part named like one in ``broken`` in any table (a shard's parts go together; a path that is not a part,
        e.g. the tables folder for a run whose rows do not add up, restages nothing). A flow's resume then skips
        what is staged and recomputes the rest. Returns the parts linked."""
        if any(path.suffix != ".parquet" for path in broken):
            return 0
        skip = {path.stem for path in broken}
        linked = 0
        for folder in sorted(self.store.tables.glob(f"*/run_id={glob.escape(self.run_id)}")):
            for part in sorted(folder.glob("*.parquet")):
                if part.stem not in skip:
                    link_atomic(part, self.part_path(folder.parent.name, part.stem))
                    linked += 1
        return linked

    def remove(self) -> None:
        """Delete the staging folder (after a commit, or to discard the run's staged work)."""
        remove_dir(self.dir)
