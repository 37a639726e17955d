"""Is every committed part whole? The checks behind incremental reuse, a completed run's rerun and `gradsift store check`.

A part is whole when its Parquet footer reads and it holds the rows recorded for it (an incremental index entry
records each reused part's rows; a run row records ``rows_written``, the sum over the run's parts). A truncated
file has no footer; ``deep`` also reads every column of every row group (slower: it reads all the data).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradsift.storage.store import Store


@dataclass(frozen=True)
class Problem:
    """A committed part (or a run's parts together) that is not what was committed."""

    path: Path
    reason: str
    run_id: str | None = None
    table: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


UNREADABLE = (OSError, ValueError, pa.ArrowException)
"""What reading a broken part raises (ArrowInvalid, a ValueError: no footer, or data that does not decode)."""


def _unreadable(err: BaseException) -> str:
    return f"unreadable Parquet ({type(err).__name__}: {err})"


def part_rows(path: Path, deep: bool = False) -> int:
    """Rows of a Parquet part, from its footer (``deep``: reading all of it); raises when it is unreadable."""
    with pq.ParquetFile(path) as part:
        if deep:
            return part.read().num_rows
        return part.metadata.num_rows


def part_problem(path: Path, rows: int | None = None, deep: bool = False) -> str | None:
    """Why the part at ``path`` is not whole (unreadable, or not ``rows`` rows where given), else None."""
    try:
        found = part_rows(path, deep)
    except UNREADABLE as err:
        return _unreadable(err)
    if rows is not None and found != rows:
        return f"{found} rows where {rows} were recorded"
    return None


def _run_parts(store: Store, run_id: str) -> list[tuple[str, Path]]:
    return sorted(
        (folder.parent.name, path)
        for folder in store.tables.glob(f"*/run_id={glob.escape(run_id)}")
        for path in folder.glob("*.parquet")
    )


def run_problems(store: Store, run_id: str, row: dict | None = None, deep: bool = False) -> list[Problem]:
    """The broken committed parts of one run; with its run ``row``, also parts that together do not hold the
    ``rows_written`` it recorded (checked once every part reads)."""
    problems, total = [], 0
    for table, path in _run_parts(store, run_id):
        try:
            total += part_rows(path, deep)
        except UNREADABLE as err:
            problems.append(Problem(path, _unreadable(err), run_id, table))
    expected = (row or {}).get("rows_written")
    if not problems and expected is not None and total != expected:
        problems.append(
            Problem(store.tables, f"run {run_id}: its parts hold {total} rows, its run row says {expected}", run_id)
        )
    return problems


def check_store(store: Store, deep: bool = False) -> list[Problem]:
    """Every committed part of the store that is not whole: unreadable run rows, unreadable parts, and completed
    runs whose parts do not add up to the rows they recorded. Staged (uncommitted) parts are not checked."""
    problems: list[Problem] = []
    rows: dict[str, dict] = {}
    for path in sorted((store.tables / "runs").glob("*.parquet")):
        if reason := part_problem(path, rows=1, deep=deep):
            problems.append(Problem(path, reason, path.stem, "runs"))
        else:
            rows[path.stem] = pq.read_table(path).to_pylist()[0]
    run_ids = {folder.name.removeprefix("run_id=") for folder in store.tables.glob("*/run_id=*") if folder.is_dir()}
    for run_id in sorted(run_ids | rows.keys()):
        row = rows.get(run_id)
        problems += run_problems(store, run_id, row if row and row["status"] == "completed" else None, deep)
    return problems
