"""Ingest: raw rows (tasks.readers) -> validated samples with content-hash ids, plus quarantine rows.

A bad row never stops ingest: it becomes a quarantine row with its category as ``reason`` (``missing_field``,
``wrong_type``, ``invalid_text``, ``unknown_label``, ``too_long``, ``tokenizer_error``, ...: data.reasons) and
what is wrong as ``detail``. A file that cannot be read at all raises ``IngestError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from gradsift.data.readers import DEFAULT_MAX_ROW_BYTES, IngestError, RawRow, open_rows
from gradsift.data.reasons import BadRow, Problem, Reason, quarantine_row
from gradsift.schemas.config import DataSource
from gradsift.schemas.tables import QUARANTINE
from gradsift.storage.keys import ShardKey

__all__ = ["IngestError", "IngestResult", "LabelRule", "ingest_source", "render_messages", "shard_samples"]


@dataclass
class IngestResult:
    dataset: str
    samples: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def quarantine_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.quarantine, schema=QUARANTINE)


@dataclass(frozen=True)
class LabelRule:
    """The label set, fixed before any row is read: a row outside it is quarantined at ingest, never a
    scoring crash. ``classes`` None with ``required``: every present label is accepted (a proxy model's
    head is sized from the data)."""

    required: bool = False
    classes: tuple[str, ...] | None = None

    def problem(self, label: str | None, field_name: str | None) -> Problem | None:
        if label is None:
            detail = f"a classifier needs field {field_name!r} on every row"
            return Problem("missing_label", detail) if self.required else None
        if self.classes is not None and label not in self.classes:
            shown = ", ".join(self.classes[:20]) + (", ..." if len(self.classes) > 20 else "")
            return Problem(
                "unknown_label",
                f"{label!r} is not one of the {len(self.classes)} classes ({shown}); "
                "name the classes with model.labels (--labels)",
            )
        return None


def render_messages(messages: list) -> tuple[str, str]:
    """Chat messages -> (prompt, response): the last assistant turn is the response; ``BadRow`` when they are not."""
    if not isinstance(messages, list):
        raise BadRow(
            "wrong_type", f"messages is {type(messages).__name__}, expected a list of {{role, content}} objects"
        )
    if not messages:
        raise BadRow("empty_text", "the messages list is empty")
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise BadRow("wrong_type", "messages must be a list of {role, content} objects with string content")
    if messages[-1].get("role") != "assistant":
        raise BadRow("no_assistant_turn", "the last message must be the assistant's (it is the response)")
    prompt = "".join(f"<|{m.get('role', 'user')}|>\n{m['content']}\n" for m in messages[:-1]) + "<|assistant|>\n"
    return prompt, messages[-1]["content"]


def content_hash(*parts: str | None) -> str:
    """sample_id: a content hash of the sample's text fields and label."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:20]


def _record_json(record: dict) -> str:
    """The record as JSON text for the ``record`` column; text that is no valid Unicode is refused."""
    try:
        raw = json.dumps(record, ensure_ascii=False, default=str)
    except RecursionError as err:
        raise BadRow("invalid_record", "nested too deep") from err
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRow(
            "invalid_text",
            f"a lone surrogate \\u{ord(raw[err.start]):04x} (an unpaired UTF-16 escape in the JSON) "
            f"at character {err.start} of the record; it is no valid Unicode",
        ) from err
    return raw


def _field(record: dict, name: str | None):
    return record.get(name) if name else None


def _sample_from_record(record: dict, source: DataSource) -> tuple[str | None, str | None, str]:
    """Returns (prompt, response, text) or raises ``BadRow`` with the reason."""
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
                raise BadRow("missing_field", f"field {name!r} is missing (prompt and response go together)")
            if not isinstance(value, str):
                raise BadRow("wrong_type", f"field {name!r} is {type(value).__name__}, expected a string")
        if not response.strip():
            raise BadRow("empty_text", f"field {source.response!r} is empty")
        return prompt, response, prompt + response
    if text is None:
        fields = ", ".join(sorted(record)) or "none"
        raise BadRow(
            "missing_field",
            f"need {source.prompt!r}+{source.response!r}, {source.text!r} or {source.messages!r} "
            f"(fields in this row: {fields}); map yours with the source's field options",
        )
    if not isinstance(text, str):
        raise BadRow("wrong_type", f"field {source.text!r} is {type(text).__name__}, expected a string")
    if not text.strip():
        raise BadRow("empty_text", f"field {source.text!r} is empty")
    return None, None, text


def ingest_source(
    source: DataSource,
    count_tokens: Callable[[str | None, str | None, str], int],
    max_tokens: int,
    labels: LabelRule = LabelRule(),
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> IngestResult:
    """Validate every row of one file: samples with content-hash ids, and quarantine rows with reasons.

    ``count_tokens(prompt, response, text)`` gives the length the sample will have when scored; an
    exception it raises quarantines the row (``tokenizer_error``).
    """
    result = IngestResult(source.name)
    seen_content: dict[str, int] = {}
    seen_ids: dict[str, tuple[str, int]] = {}

    def reject(row: RawRow, reason: Problem | Reason, detail: str = "") -> None:
        problem = reason if isinstance(reason, Problem) else Problem(reason, detail)
        result.quarantine.append(quarantine_row(source.name, source.path, row.line, problem, row.raw))

    rows = open_rows(source, max_row_bytes)
    result.notes = rows.notes
    for row in rows.rows:
        if row.record is None:
            reject(row, row.problem)
            continue
        rec = row.record
        try:
            record_json = _record_json(rec)
            prompt, response, text = _sample_from_record(rec, source)
        except BadRow as err:
            reject(row, err.problem)
            continue
        label = _field(rec, source.label)
        if label is not None and not isinstance(label, str | int | bool):
            reject(row, "wrong_type", f"field {source.label!r} is {type(label).__name__}, expected a string or integer")
            continue
        label = None if label is None else str(label)
        if problem := labels.problem(label, source.label):
            reject(row, problem)
            continue
        domain = _field(rec, source.domain) or source.constant_domain or source.name
        try:
            n_tokens = count_tokens(prompt, response, text)
        except Exception as err:  # a tokenizer's own failure on one row must not stop the file
            reject(row, "tokenizer_error", f"{type(err).__name__}: {err}"[:500])
            continue
        if n_tokens > max_tokens:
            reject(row, "too_long", f"{n_tokens} tokens > max_tokens {max_tokens}")
            continue
        sample_id = content_hash(prompt, response, text if prompt is None else None, label)
        own_id = _field(rec, source.id)
        if own_id is not None:
            first = seen_ids.get(str(own_id))
            if first and first[0] != sample_id:
                reject(row, "duplicate_id", f"id {own_id!r} with different content (first at line {first[1]})")
                continue
            seen_ids.setdefault(str(own_id), (sample_id, row.line))
        if sample_id in seen_content:
            reject(row, "duplicate", f"exact duplicate of line {seen_content[sample_id]}")
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
                "record": record_json,
            }
        )
    return result


def shard_samples(samples: list[dict], dataset: str, shard_size: int) -> list[tuple[str, list[dict]]]:
    """Fixed-size shards in file order, named by dataset, index and a hash of their sample ids (``ShardKey``)."""
    shards = []
    for start in range(0, len(samples), shard_size):
        chunk = samples[start : start + shard_size]
        name = ShardKey.of(dataset, start // shard_size, (s["sample_id"] for s in chunk)).name
        shards.append((name, [{**s, "shard": name} for s in chunk]))
    return shards
