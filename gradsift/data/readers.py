"""Reading input files into raw rows, one row at a time, never letting one row stop the others.

Every per-row problem (undecodable bytes, invalid JSON, nesting too deep, a CSV field over the limit,
an unbalanced quote, a bare carriage return, a line over ``max_row_bytes``) comes back on the row as a
``Problem`` (its category and the specifics, data.reasons); the file goes on. A file that cannot be read
at all (missing, a folder, empty, not gzip, UTF-16 without a byte-order mark, corrupt Parquet, a .json
that is no list) raises ``IngestError`` naming the file. Byte-order marks are detected and reported in ``notes``; a
truncated ``.gz`` keeps the rows read before the cut and reports the cut as a row.

Lines are physical line numbers of the (decompressed) file, for CSV too; the byte-length check runs
before any parsing, so a 50 MB line costs a bounded read, not its parse.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow.parquet as pq

from gradsift.data.reasons import Problem
from gradsift.schemas.config import DataSource, IngestConfig

DEFAULT_MAX_ROW_BYTES: int = IngestConfig.model_fields["max_row_bytes"].default
_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"),
)


class IngestError(RuntimeError):
    """A whole input file cannot be read."""


@dataclass
class RawRow:
    line: int
    record: dict | None  # None when the row could not be parsed
    raw: str
    error: Problem | None = None

    @property
    def problem(self) -> Problem:
        """Why a row without a record has none."""
        return self.error or Problem("unreadable_row", "the row gave no record and no reader error")


@dataclass
class FileRows:
    """The rows of one file (read lazily) and what was noticed about the file as a whole."""

    rows: Iterator[RawRow]
    notes: list[str] = field(default_factory=list)


def detect_format(source: DataSource) -> str:
    if source.format != "auto":
        return source.format
    name = source.path.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet")):
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return fmt
    raise IngestError(f"{source.path}: unknown file type; use .jsonl .json .csv .tsv .parquet or set format=")


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise IngestError(f"{path}: is a folder, not a file; pass the files inside it (e.g. {path}/*.jsonl)")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise IngestError(f"{path}: cannot read file: {err.strerror or err}") from err
    if size == 0:
        raise IngestError(f"{path}: empty file (0 bytes), no rows")


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it ends in .gz (checked here, so a non-gzip file fails by name)."""
    try:
        fh = path.open("rb")
    except OSError as err:
        raise IngestError(f"{path}: cannot read file: {err.strerror or err}") from err
    if path.suffix != ".gz":
        return fh
    if fh.read(2) != b"\x1f\x8b":
        fh.close()
        raise IngestError(f"{path}: not a valid gzip file (no gzip header); drop the .gz suffix if it is plain text")
    fh.seek(0)
    return gzip.GzipFile(fileobj=fh)


def _sniff_encoding(path: Path, head: bytes) -> tuple[str, int, str | None]:
    """(codec, bytes of byte-order mark, note) of a text file from its first bytes."""
    for bom, codec, name in _BOMS:
        if head.startswith(bom):
            return codec, len(bom), f"{path.name}: {name} byte-order mark found; decoded as {name}"
    sample = head[:4096]
    if len(sample) >= 4 and sample.count(0) * 4 >= len(sample):
        raise IngestError(
            f"{path}: looks like UTF-16/32 text without a byte-order mark (many NUL bytes); "
            "save it as UTF-8 (e.g. iconv -f UTF-16LE -t UTF-8)"
        )
    return "utf-8", 0, None


def _text_lines(path: Path, limit: int, notes: list[str]) -> Iterator[tuple[int, bytes | None, Problem | None]]:
    """(physical line number, UTF-8 bytes without the line end or None when over ``limit``, error) per line.

    Lines end at ``\\n`` only (a bare ``\\r`` stays inside its line). A decompression or decoding failure
    mid-file ends the file with one error item; what came before it is kept.
    """
    fh = _open(path)
    try:
        head = fh.peek(4096)[:4096] if hasattr(fh, "peek") else b""
    except (OSError, EOFError, zlib.error) as err:
        fh.close()
        raise IngestError(f"{path}: not a valid gzip file: {err}") from err
    codec, skip, note = _sniff_encoding(path, head)
    if note:
        notes.append(note)
    fh.read(skip)
    stream: BinaryIO | io.TextIOWrapper = fh
    if codec != "utf-8":
        stream = io.TextIOWrapper(fh, encoding=codec, errors="strict", newline="\n")
    number = 0
    try:
        while True:
            chunk = stream.readline(limit + 1)
            if not chunk:
                return
            number += 1
            if isinstance(chunk, str):
                chunk = chunk.encode("utf-8", "surrogatepass")
            if len(chunk) > limit and not chunk.endswith(b"\n"):
                size = len(chunk) + _skip_to_line_end(stream)
                yield (
                    number,
                    None,
                    Problem("too_long", f"line of {size:,}+ bytes > max_row_bytes {limit:,} (not parsed)"),
                )
                continue
            yield number, chunk.rstrip(b"\n").removesuffix(b"\r"), None
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        yield (
            number + 1,
            None,
            Problem("truncated_file", f"the compressed data ends early ({err}); rows before line {number + 1} kept"),
        )
    except UnicodeDecodeError as err:
        yield (
            number + 1,
            None,
            Problem("undecodable", f"not valid {codec} ({err.reason}); rows before line {number + 1} kept"),
        )
    finally:
        fh.close()


def _skip_to_line_end(stream) -> int:
    """Read past the rest of an over-long line in bounded chunks; returns how much was skipped."""
    skipped = 0
    while True:
        chunk = stream.readline(1 << 20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n" if isinstance(chunk, bytes) else "\n"):
            return skipped


def _decode(line: bytes) -> tuple[str, Problem | None]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return line.decode("utf-8", "replace"), Problem("undecodable", f"{err.reason} at byte {err.start} (not UTF-8)")


def _json_record(text: str) -> tuple[dict | None, Problem | None]:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as err:
        return None, Problem("invalid_json", f"{err.msg} at column {err.colno}")
    except RecursionError:
        return None, Problem("invalid_json", "nested too deep to parse")
    if not isinstance(rec, dict):
        return None, Problem("not_an_object", f"the record is a JSON {type(rec).__name__}")
    return rec, None


def _jsonl_rows(path: Path, limit: int, notes: list[str]) -> Iterator[RawRow]:
    for number, line, error in _text_lines(path, limit, notes):
        if error:
            yield RawRow(number, None, "", error)
            continue
        if not line.strip():
            continue
        text, error = _decode(line)
        if error:
            yield RawRow(number, None, text, error)
            continue
        rec, error = _json_record(text)
        yield RawRow(number, rec, text, error)


def _read_whole(path: Path, limit: int, notes: list[str]) -> str:
    """A whole .json file as text (its size bounded by ``limit`` per record on average is not knowable)."""
    parts = []
    for number, line, error in _text_lines(path, 1 << 62, notes):
        if error:
            raise IngestError(f"{path}: {error.reason}: {error.detail.split('; rows before')[0]} at line {number}")
        parts.append(line)
    text, error = _decode(b"\n".join(parts))
    if error:
        raise IngestError(f"{path}: {error.reason}: {error.detail}")
    return text


def _json_rows(path: Path, limit: int, notes: list[str]) -> Iterator[RawRow]:
    text = _read_whole(path, limit, notes)
    if not text.strip():
        raise IngestError(f"{path}: empty file (only whitespace), no rows")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise IngestError(f"{path}: not valid JSON ({err}); for one record per line use .jsonl") from err
    except RecursionError as err:
        raise IngestError(f"{path}: JSON nested too deep to parse; for one record per line use .jsonl") from err
    if not isinstance(records, list):
        raise IngestError(f"{path}: a .json file must hold a list of records, found {type(records).__name__}")
    for i, rec in enumerate(records, start=1):
        yield _sized_record(i, rec, limit)


def _sized_record(number: int, rec, limit: int) -> RawRow:
    """A record parsed as part of a whole file, checked for type and size like a line would be."""
    try:
        raw = json.dumps(rec, ensure_ascii=False, default=str)
    except (RecursionError, ValueError) as err:
        return RawRow(number, None, "", Problem("invalid_record", str(err)))
    if len(raw.encode("utf-8", "surrogatepass")) > limit:
        return RawRow(number, None, raw[:10_000], Problem("too_long", f"record over max_row_bytes {limit:,}"))
    if not isinstance(rec, dict):
        return RawRow(number, None, raw, Problem("not_an_object", f"the record is a JSON {type(rec).__name__}"))
    return RawRow(number, rec, raw)


def _parquet_rows(path: Path, limit: int) -> Iterator[RawRow]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise IngestError(f"{path}: not a readable Parquet file: {err}") from err
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                number += 1
                yield _sized_record(number, rec, limit)
    except Exception as err:  # a corrupt row group after good ones: keep what was read
        yield RawRow(number + 1, None, "", Problem("unreadable_data", f"{type(err).__name__}: {err}; rows before kept"))


class _LineFeed:
    """Physical lines for ``csv.reader``, remembering which lines the current record took, so that a
    record that went wrong across several lines can be re-read from its second line."""

    def __init__(self, lines: Iterator[tuple[int, bytes | None, Problem | None]]):
        self.source = lines
        self.pending: deque[tuple[int, bytes | None, Problem | None]] = deque()
        self.taken: list[tuple[int, bytes | None, Problem | None]] = []

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        item = self.pending.popleft() if self.pending else next(self.source)
        self.taken.append(item)
        line = item[1]
        return "" if line is None else line.decode("utf-8", "surrogateescape") + "\n"

    def rewind(self) -> None:
        """Give back every line of the current record but its first."""
        self.pending.extendleft(reversed(self.taken[1:]))


def _csv_rows(path: Path, fmt: str, source: DataSource, limit: int, notes: list[str]) -> Iterator[RawRow]:
    delimiter = "\t" if fmt == "tsv" else ","
    csv.field_size_limit(limit)
    feed = _LineFeed(_text_lines(path, limit, notes))
    reader = csv.reader(feed, delimiter=delimiter)
    header = source.columns
    while True:
        feed.taken = []
        try:
            cells = next(reader)
            error = None
        except StopIteration:
            return
        except csv.Error as err:
            cells, error = None, Problem("invalid_csv", str(err))
            if "new-line character" in str(err):
                error = Problem("invalid_csv", "a bare carriage return (\\r) inside an unquoted field; quote the field")
        if not feed.taken:
            return
        first, last = feed.taken[0][0], feed.taken[-1][0]
        bad_line = next((e for _, _, e in feed.taken if e), None)
        raw = "\n".join((b or b"").decode("utf-8", "replace") for _, b, _ in feed.taken)[:10_000]
        if bad_line:
            feed.rewind()
            yield RawRow(first, None, raw, bad_line)
            continue
        if error is None and cells == []:
            continue  # a blank line
        if header is None and error is None:
            header = cells
            continue
        spans = last > first
        if spans and (error is not None or len(cells) != len(header)):
            feed.rewind()
            yield RawRow(
                first,
                None,
                raw.split("\n", 1)[0],
                Problem(
                    "unbalanced_quote",
                    f"a quoted field opened on line {first} runs to line {last}; the lines after it are read again",
                ),
            )
            continue
        if error is not None:
            yield RawRow(first, None, raw, error)
            continue
        joined = delimiter.join(cells)
        if any("\udc80" <= ch <= "\udcff" for ch in joined):
            yield RawRow(first, None, raw, Problem("undecodable", "not UTF-8"))
        elif len(cells) != len(header):
            yield RawRow(
                first,
                None,
                joined,
                Problem("wrong_columns", f"expected {len(header)} columns ({', '.join(header)}), found {len(cells)}"),
            )
        else:
            yield RawRow(first, dict(zip(header, cells, strict=True)), joined)


def open_rows(source: DataSource, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> FileRows:
    """The rows of one file; raises ``IngestError`` now when the file cannot be read at all."""
    path = Path(source.path)
    fmt = detect_format(source)
    _check_readable(path)
    notes: list[str] = []
    if fmt == "parquet":
        rows = _parquet_rows(path, max_row_bytes)
    elif fmt == "json":
        rows = _json_rows(path, max_row_bytes, notes)
    elif fmt == "jsonl":
        rows = _jsonl_rows(path, max_row_bytes, notes)
    else:
        rows = _csv_rows(path, fmt, source, max_row_bytes, notes)
    first = next(rows, None)  # whole-file problems surface here, before any row is taken

    def chained() -> Iterator[RawRow]:
        if first is not None:
            yield first
            yield from rows

    return FileRows(chained(), notes)


def read_rows(source: DataSource, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[RawRow]:
    """Parse a file into rows; per-row problems are reported on the row, not raised."""
    return open_rows(source, max_row_bytes).rows
