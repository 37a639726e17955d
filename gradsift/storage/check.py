"""Is every data file the lake references there and readable? `gradsift store check`.

A DuckLake commit is atomic, so the states the old layout had to repair (a half-moved run, a catalog behind the
runs) cannot happen; what can is damage from outside: a data file deleted or truncated under ``lake_data/``. A
file is whole when its Parquet footer reads and holds the rows the catalog recorded for it; ``deep`` also reads
every column of every row group (slower: it reads all the data).
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradsift.storage.lake import LAKE_SCHEMAS, Lake, stored_name
from gradsift.storage.store import Store


@dataclass(frozen=True)
class Problem:
    """A data file of the lake that is not what was committed."""

    path: Path
    reason: str
    table: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" + (f" (table {self.table})" if self.table else "")


UNREADABLE = (OSError, ValueError, pa.ArrowException)
"""What reading a broken file raises (ArrowInvalid, a ValueError: no footer, or data that does not decode)."""


def part_problem(path: Path, rows: int | None = None, deep: bool = False) -> str | None:
    """Why the Parquet file at ``path`` is not whole (missing, unreadable, or not ``rows`` rows), else None."""
    if not path.exists():
        return "missing"
    try:
        with pq.ParquetFile(path) as part:
            found = part.read().num_rows if deep else part.metadata.num_rows
    except UNREADABLE as err:
        return f"unreadable Parquet ({type(err).__name__}: {err})"
    if rows is not None and found != rows:
        return f"{found} rows where {rows} were committed"
    return None


def lake_files(store: Store) -> list[tuple[str, Path, int | None]]:
    """(table, path, rows or None for a delete file) of every file the lake's current snapshot reads."""
    with closing(store.reader()) as con:
        files = []
        for table in LAKE_SCHEMAS:
            rows = con.execute(
                "SELECT data_file, delete_file FROM ducklake_list_files(?, ?)", [Lake.ALIAS, stored_name(table)]
            ).fetchall()
            counts = {
                Path(path).name: n
                for path, n in con.execute(
                    f"SELECT f.path, f.record_count FROM __ducklake_metadata_{Lake.ALIAS}.ducklake_data_file f "
                    f"JOIN __ducklake_metadata_{Lake.ALIAS}.ducklake_table t USING (table_id) "
                    "WHERE t.table_name = ? AND f.end_snapshot IS NULL AND t.end_snapshot IS NULL",
                    [stored_name(table)],
                ).fetchall()
            }
            for data, delete in rows:
                files.append((table, Path(data), counts.get(Path(data).name)))
                if delete:
                    files.append((table, Path(delete), None))
    return files


def check_store(store: Store, deep: bool = False) -> list[Problem]:
    """Every file of the lake's current state that is missing, unreadable or not the rows committed."""
    return [
        Problem(path, reason, table)
        for table, path, rows in lake_files(store)
        if (reason := part_problem(path, rows, deep)) is not None
    ]
