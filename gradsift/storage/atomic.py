"""The one place files and folders are replaced atomically: write a temp sibling, then ``os.replace``.

Every writer in gradsift that must never leave a half-written file behind goes through here:
staged Parquet parts, JSON stage markers, JSONL manifests, training checkpoint folders, and the moves of a
committed run's artifacts. (The lake's own files are DuckLake's to write.)

* ``write_atomic(path, data)``: ``data`` is bytes, text, or a function ``write(tmp)`` that creates the
  temp file (it may also create sidecar files named ``<tmp>...``, e.g. DuckDB's ``.wal``).
* ``parquet_writer_atomic(path, schema)``: a Parquet file written a table at a time, renamed into place at the end.
* ``write_dir_atomic(path, write)``: ``write(tmp_dir)`` fills a temp folder that then replaces ``path``.
* ``replace_dir(src, dest)``: move a finished folder onto ``dest``, replacing what is there;
  ``remove_dir(path)``: make a folder disappear at once (renamed aside, then deleted).

A failed write leaves no temp file. A full disk raises ``OSError(ENOSPC, "no space left on device",
path)`` naming the destination (pyarrow's and ``write()``'s own errors name no file, or the temp file).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

Writer = Callable[[Path], object]


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name beside ``path`` (same folder, so same filesystem: the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.{kind}")


def _full_disk(err: OSError, path: Path) -> OSError:
    if err.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, "no space left on device", str(path))
    return err


def _remove(tmp: Path) -> None:
    """The temp file or folder and any sidecar files that share its (unique) name."""
    for leftover in [tmp, *tmp.parent.glob(f"{glob.escape(tmp.name)}*")]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, path: Path) -> Iterator[None]:
    """A failed write leaves no temp file (nor its side files); a full disk is named by ``path``."""
    try:
        yield
    except OSError as err:
        _remove(tmp)
        full = _full_disk(err, path)
        if full is err:
            raise
        raise full from err
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: Path, data: bytes | str | Writer) -> Path:
    """Write ``data`` to ``path`` via a temp file and rename: readers see all of it or nothing; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    with _removed_on_failure(tmp, path):
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    return path


def write_parquet_atomic(table: pa.Table, path: Path, row_group_size: int | None = None) -> Path:
    """Write ``table`` to ``path`` (zstd; vector columns undictionaried, in row groups of 1024)."""
    vector_cols = [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
    return write_atomic(
        path,
        lambda tmp: pq.write_table(
            table,
            tmp,
            row_group_size=row_group_size or (1024 if vector_cols else None),
            use_dictionary=[f.name for f in table.schema if f.name not in vector_cols],
            compression="zstd",
        ),
    )


@contextlib.contextmanager
def parquet_writer_atomic(path: Path, schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
    """``with parquet_writer_atomic(path, schema) as write: write(table) ...``: one Parquet file written a table
    (a row group) at a time, with ``write_parquet_atomic``'s settings; it appears at ``path`` when the block ends
    and not at all when the block raises. No ``write`` call: a file of no rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    vector_cols = [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]
    with _removed_on_failure(tmp, path):
        use_dictionary = [f.name for f in schema if f.name not in vector_cols]
        with pq.ParquetWriter(tmp, schema, use_dictionary=use_dictionary, compression="zstd") as writer:
            yield lambda table: writer.write_table(table, row_group_size=1024 if vector_cols else None)
        os.replace(tmp, path)


def write_json_atomic(data: dict, path: Path) -> Path:
    """Write ``data`` as JSON (markers and index entries)."""
    return write_atomic(path, json.dumps(data))


def write_jsonl_atomic(rows: Iterable[dict], path: Path) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    return write_atomic(path, write)


def replace_dir(src: Path, dest: Path) -> Path:
    """Move the folder ``src`` onto ``dest`` (same filesystem), replacing a folder already there.

    The old ``dest`` is first renamed aside (``.<name>.old``) and removed last, so ``dest`` is at no point a
    mix of old and new files; a crash in between leaves ``src`` or ``dest`` whole and the ``.old`` folder,
    which the next call removes.
    """
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except OSError as err:
        if old.exists() and not dest.exists():
            os.replace(old, dest)  # put the old folder back
        full = _full_disk(err, dest)
        if full is err:
            raise
        raise full from err
    shutil.rmtree(old, ignore_errors=True)
    return dest


def remove_dir(path: Path) -> None:
    """Remove a folder as one step for readers: renamed aside (``.<name>.<hex>.trash``) first, then deleted."""
    path = Path(path)
    trash = temp_sibling(path, "trash")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def write_dir_atomic(path: Path, write: Writer) -> Path:
    """Fill a temp folder with ``write(tmp_dir)``, then move it onto ``path`` (``replace_dir``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, "tmpdir")
    tmp.mkdir()
    with _removed_on_failure(tmp, path):
        write(tmp)
        replace_dir(tmp, path)
    return path
