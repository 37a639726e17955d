"""A derived copy of a staged ``features`` part's float16 rows that is read by mapping, not decoding.

The staged Parquet part (``<staging>/features/<part>.parquet``, float16 fixed-size lists) stays the one copy of
truth: the commit reads it into the lake, where the ``features`` view shows it to DuckDB. Decoding its fixed-size
lists costs 40-55 ms per 1,000 rows of 8,192 floats (the lists' levels, not zstd: uncompressed PLAIN decodes nearly as
slowly), about half the time of the rows' products with 1,000 targets. So a writer that knows influence will stream
the part also writes its rows raw, and the influence blocks map that file instead (``bench/RESULTS.md``, issue 16).

* ``write_rows(staging_dir, part, table)``: after the part is written, its ``feature`` column as
  ``<staging>/_scratch/feature_rows/<part>/<identity>.npy`` ([rows, k] float16 in the part's row order), written
  atomically; ``identity`` is the part file's inode, size and mtime (``os.replace`` of a rewritten part changes
  them).
* ``read_rows(staging_dir, part)``: the rows, memory-mapped, when a file of the part's current identity is there
  and has the part's shape; otherwise (no copy yet, the part rewritten since, a copy of another shape) decoded from
  the part and written again. Never a stale copy.
* ``prefetch(staging_dir, parts)``: have the kernel read parts' rows into the page cache (``POSIX_FADV_WILLNEED``);
  the influence blocks run it on a thread for their own block and the block after, so that the disk reads overlap
  the products.

The copy lives in the run's scratch folder: never committed, removed with the staging folder by the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradsift.storage.atomic import write_atomic
from gradsift.storage.store import SCRATCH_DIR

ROWS_DIR = "feature_rows"


def part_path(staging_dir: Path, part: str) -> Path:
    return Path(staging_dir) / "features" / f"{part}.parquet"


def _identity(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _rows_dir(staging_dir: Path, part: str) -> Path:
    return Path(staging_dir) / SCRATCH_DIR / ROWS_DIR / part


def feature_matrix(table: pa.Table) -> np.ndarray:
    """A ``features`` table's ``feature`` column as one [rows, k] float16 array."""
    column = table.column("feature").combine_chunks()
    k = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(len(table), k).astype(np.float16, copy=False)


def rows_file(staging_dir: Path, part: str) -> Path:
    """Where the raw rows of ``part`` as it is now are (or would be)."""
    return _rows_dir(staging_dir, part) / f"{_identity(part_path(staging_dir, part))}.npy"


def _save(staging_dir: Path, part: str, mat: np.ndarray) -> None:
    path = rows_file(staging_dir, part)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, np.ascontiguousarray(mat))

    write_atomic(path, write)
    for old in path.parent.glob("*.npy"):  # temp files are dot-named .tmp: another writer's is left alone
        if old != path:
            old.unlink(missing_ok=True)


def write_rows(staging_dir: Path, part: str, table: pa.Table) -> None:
    """The raw rows of ``table``, the contents of the part just written as ``part``; older copies are removed."""
    _save(staging_dir, part, feature_matrix(table))


def read_rows(staging_dir: Path, part: str, rows: int, k: int) -> np.ndarray:
    """The [rows, k] float16 rows of ``part`` in its row order, memory-mapped from the raw copy (rebuilt from the part
    when missing or stale)."""
    try:
        mat = np.load(rows_file(staging_dir, part), mmap_mode="r")
        if mat.shape == (rows, k) and mat.dtype == np.float16:
            return mat
    except (FileNotFoundError, ValueError, OSError):
        pass
    src = part_path(staging_dir, part)
    mat = feature_matrix(pq.read_table(src, columns=["feature"]))
    if mat.shape != (rows, k):
        raise ValueError(f"{src}: feature rows {mat.shape}, expected {(rows, k)}")
    _save(staging_dir, part, mat)
    return mat


def prefetch(staging_dir: Path, parts: list[str]) -> None:
    """Read the raw rows of ``parts`` into the page cache (``POSIX_FADV_WILLNEED``; parts without rows are skipped).
    The kernel does the reading; run it on a thread to overlap it with compute (``signals.influence.score_block``)."""
    for part in parts:
        try:
            fd = os.open(rows_file(staging_dir, part), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
