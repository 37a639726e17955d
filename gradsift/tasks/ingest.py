"""Ingest: files -> validated samples with content-hash ids, plus quarantine rows with reasons.

A bad row never stops ingest: it becomes a quarantine row naming what is wrong. A file that cannot
be read at all raises ``IngestError`` naming the file and the problem.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradsift.schemas.config import DataSource
from gradsift.schemas.tables import QUARANTINE


class IngestError(RuntimeError):
    """A whole input file cannot be read."""


@dataclass
class RawRow:
    line: int
    record: dict | None  # None when the row could not be parsed
    raw: str
    error: str | None = None


@dataclass
class IngestResult:
    dataset: str
    samples: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)

    def quarantine_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.quarantine, schema=QUARANTINE)


def detect_format(source: DataSource) -> str:
    if source.format != "auto":
        return source.format
    name = source.path.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet")):
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return fmt
    raise IngestError(f"{source.path}: unknown file type; use .jsonl .json .csv .tsv .parquet or set format=")


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IngestError(f"{path}: cannot read file: {err.strerror or err}") from err
    if path.suffix == ".gz":
        import gzip

        try:
            data = gzip.decompress(data)
        except OSError as err:
            raise IngestError(f"{path}: not a valid gzip file: {err}") from err
    return data


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_rows(source: DataSource) -> Iterator[RawRow]:
    """Parse a file into rows; per-row problems are reported on the row, not raised."""
    path = Path(source.path)
    fmt = detect_format(source)
    if fmt == "parquet":
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise IngestError(f"{path}: not a readable Parquet file: {err}") from err
        for i, rec in enumerate(records, start=1):
            yield RawRow(i, rec, json.dumps(rec, default=str))
        return
    data = _read_bytes(path)
    if fmt == "json":
        try:
            records = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IngestError(f"{path}: not valid UTF-8 JSON ({err}); for one record per line use .jsonl") from err
        if not isinstance(records, list):
            raise IngestError(f"{path}: a .json file must hold a list of records, found {type(records).__name__}")
        for i, rec in enumerate(records, start=1):
            raw = json.dumps(rec, ensure_ascii=False)
            yield RawRow(i, rec, raw) if isinstance(rec, dict) else RawRow(i, None, raw, "record is not an object")
        return
    if fmt == "jsonl":
        for i, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RawRow(
                    i, None, line.decode("utf-8", "replace"), f"undecodable bytes: {err.reason} at byte {err.start}"
                )
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as err:
                yield RawRow(i, None, text, f"invalid JSON: {err.msg} at column {err.colno}")
                continue
            yield RawRow(i, rec, text) if isinstance(rec, dict) else RawRow(i, None, text, "record is not an object")
        return
    # csv / tsv
    text = data.decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
    header = source.columns
    for i, cells in enumerate(reader, start=1):
        if header is None:
            header = cells
            continue
        raw = ("\t" if fmt == "tsv" else ",").join(cells)
        if _has_surrogates(raw):
            yield RawRow(
                i,
                None,
                raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                "undecodable bytes (not UTF-8)",
            )
        elif len(cells) != len(header):
            yield RawRow(i, None, raw, f"expected {len(header)} columns ({', '.join(header)}), found {len(cells)}")
        else:
            yield RawRow(i, dict(zip(header, cells, strict=True)), raw)


def render_messages(messages: list) -> tuple[str, str]:
    """Chat messages -> (prompt, response): the last assistant turn is the response."""
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise ValueError("messages must be a non-empty list of {role, content} objects with string content")
    if messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's (it is the response)")
    prompt = "".join(f"<|{m.get('role', 'user')}|>\n{m['content']}\n" for m in messages[:-1]) + "<|assistant|>\n"
    return prompt, messages[-1]["content"]


def content_hash(*parts: str | None) -> str:
    """sample_id: a content hash of the sample's text fields and label."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:20]


def _field(record: dict, name: str | None):
    return record.get(name) if name else None


def _sample_from_record(record: dict, source: DataSource) -> tuple[str | None, str | None, str]:
    """Returns (prompt, response, text) or raises ValueError with the reason."""
    messages = _field(record, source.messages)
    if messages is not None:
        prompt, response = render_messages(messages)
        return prompt, response, prompt + response
    prompt, response, text = (
        _field(record, source.prompt),
        _field(record, source.response),
        _field(record, source.text),
    )
    if response is not None or prompt is not None:
        for name, value in ((source.prompt, prompt), (source.response, response)):
            if value is None:
                raise ValueError(f"missing field {name!r} (prompt and response go together)")
            if not isinstance(value, str):
                raise ValueError(f"wrong type: field {name!r} is {type(value).__name__}, expected a string")
        if not response.strip():
            raise ValueError(f"empty text in field {source.response!r}")
        return prompt, response, prompt + response
    if text is None:
        fields = ", ".join(sorted(record)) or "none"
        raise ValueError(
            f"missing field: need {source.prompt!r}+{source.response!r}, {source.text!r} or {source.messages!r} "
            f"(fields in this row: {fields}); map yours with the source's field options"
        )
    if not isinstance(text, str):
        raise ValueError(f"wrong type: field {source.text!r} is {type(text).__name__}, expected a string")
    if not text.strip():
        raise ValueError(f"empty text in field {source.text!r}")
    return None, None, text


def ingest_source(
    source: DataSource, count_tokens: Callable[[str | None, str | None, str], int], max_tokens: int
) -> IngestResult:
    """Validate every row of one file: samples with content-hash ids, and quarantine rows with reasons.

    ``count_tokens(prompt, response, text)`` gives the length the sample will have when scored.
    """
    result = IngestResult(source.name)
    seen_content: dict[str, int] = {}
    seen_ids: dict[str, tuple[str, int]] = {}

    def reject(row: RawRow, reason: str) -> None:
        result.quarantine.append(
            {"dataset": source.name, "source": source.path, "line": row.line, "reason": reason, "raw": row.raw[:10_000]}
        )

    for row in read_rows(source):
        if row.record is None:
            reject(row, row.error or "unreadable row")
            continue
        rec = row.record
        try:
            prompt, response, text = _sample_from_record(rec, source)
        except ValueError as err:
            reject(row, str(err))
            continue
        label = _field(rec, source.label)
        if label is not None and not isinstance(label, str | int | bool):
            reject(row, f"wrong type: field {source.label!r} is {type(label).__name__}, expected a string or integer")
            continue
        label = None if label is None else str(label)
        domain = _field(rec, source.domain) or source.constant_domain or source.name
        n_tokens = count_tokens(prompt, response, text)
        if n_tokens > max_tokens:
            reject(row, f"over-long: {n_tokens} tokens > max_tokens {max_tokens}")
            continue
        sample_id = content_hash(prompt, response, text if prompt is None else None, label)
        own_id = _field(rec, source.id)
        if own_id is not None:
            first = seen_ids.get(str(own_id))
            if first and first[0] != sample_id:
                reject(row, f"duplicate id {own_id!r} with different content (first at line {first[1]})")
                continue
            seen_ids.setdefault(str(own_id), (sample_id, row.line))
        if sample_id in seen_content:
            reject(row, f"exact duplicate of line {seen_content[sample_id]}")
            continue
        seen_content[sample_id] = row.line
        result.samples.append(
            {
                "dataset": source.name,
                "sample_id": sample_id,
                "shard": None,
                "domain": str(domain),
                "label": label,
                "prompt": prompt,
                "response": response,
                "text": text,
                "n_tokens": n_tokens,
                "source": source.path,
                "line": row.line,
                "record": json.dumps(rec, ensure_ascii=False, default=str),
            }
        )
    return result


def shard_samples(samples: list[dict], dataset: str, shard_size: int) -> list[tuple[str, list[dict]]]:
    """Fixed-size shards in file order, named by dataset, index and a hash of their sample ids."""
    shards = []
    for start in range(0, len(samples), shard_size):
        chunk = samples[start : start + shard_size]
        digest = hashlib.sha256("".join(s["sample_id"] for s in chunk).encode()).hexdigest()[:10]
        name = f"{dataset}-{start // shard_size:05d}-{digest}"
        shards.append((name, [{**s, "shard": name} for s in chunk]))
    return shards
