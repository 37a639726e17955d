"""Ingest: raw rows (tasks.readers) -> validated samples with content-hash ids, plus quarantine rows.

A bad row never stops ingest: it becomes a quarantine row with its category as ``reason`` (``missing_field``,
``wrong_type``, ``invalid_text``, ``unknown_label``, ``too_long``, ``tokenizer_error``, ...: data.reasons) and
what is wrong as ``detail``. A file that cannot be read at all raises ``IngestError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gradsift.data.readers import DEFAULT_MAX_ROW_BYTES, IngestError, RawRow, open_rows
from gradsift.data.reasons import BadRow, Problem, quarantine_row, text_field
from gradsift.data.seen import FirstSeen
from gradsift.schemas.config import DataSource
from gradsift.storage.keys import ShardKey

__all__ = [
    "BatchCounter",
    "IngestError",
    "IngestResult",
    "IngestStream",
    "LabelRule",
    "TokenCounter",
    "ingest_source",
    "render_messages",
    "shard_samples",
]


@dataclass
class IngestResult:
    dataset: str
    samples: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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


def _pair_from_record(record: dict, source: DataSource) -> str | None:
    """The sentence pair's second text when the source names one (``source.text_pair``), else None;
    ``BadRow`` when it is named and missing, not a string or blank."""
    if source.text_pair is None:
        return None
    return text_field(record, source.text_pair, what="pair field")


TokenCounter = Callable[..., int]
"""``count_tokens(prompt, response, text[, text_pair])``: the length a sample will have when scored (the pair
is passed only for sentence pairs)."""
BatchCounter = Callable[[list[tuple]], list[int]]
"""The same counts for many rows in one call (a tokenizer's batch call); it may raise for the whole batch."""

BATCH_ROWS = 256
"""Rows validated and tokenized together (fewer when their raw text passes ``BATCH_CHARS``)."""
BATCH_CHARS = 8 << 20


@dataclass
class _Candidate:
    """A row that passed every check that comes before tokenizing; then its length and sample id."""

    row: RawRow
    prompt: str | None
    response: str | None
    text: str
    text_pair: str | None
    label: str | None
    domain: str
    record: str
    n_tokens: int | Problem = 0  # or its tokenizer_error
    sample_id: str | None = None  # set once the row is within the length limit
    key: bytes = b""  # the sample id's 10 bytes
    own_key: bytes | None = None  # the digest of the row's own id, if it has one


def _check(row: RawRow, source: DataSource, labels: LabelRule, dataset: str) -> _Candidate | Problem:
    """The row's sample fields, or the reason it is quarantined (the checks before tokenizing, in order);
    ``dataset`` is ``source.name`` (a property worth computing once a file)."""
    if row.record is None:
        return row.problem
    rec = row.record
    try:
        record_json = _record_json(rec)
        prompt, response, text = _sample_from_record(rec, source)
        text_pair = _pair_from_record(rec, source)
    except BadRow as err:
        return err.problem
    label = _field(rec, source.label)
    if label is not None and not isinstance(label, str | int | bool):
        return Problem("wrong_type", f"field {source.label!r} is {type(label).__name__}, expected a string or integer")
    label = None if label is None else str(label)
    if problem := labels.problem(label, source.label):
        return problem
    domain = _field(rec, source.domain) or source.constant_domain or dataset
    return _Candidate(row, prompt, response, text, text_pair, label, str(domain), record_json)


def _count(
    cands: list[_Candidate], count_tokens: TokenCounter, count_batch: BatchCounter | None
) -> list[int | Problem]:
    """Token count of each candidate, or its ``tokenizer_error``: one batch call when ``count_batch`` is
    given and succeeds, else row by row (a tokenizer's failure on one row stays that row's)."""
    texts = [(c.prompt, c.response, c.text) + (() if c.text_pair is None else (c.text_pair,)) for c in cands]
    if count_batch is not None and texts:
        try:
            counts = list(count_batch(texts))
        except Exception:  # some row of the batch fails: count row by row to find it
            counts = []
        if len(counts) == len(texts):
            return counts
    counted: list[int | Problem] = []
    for row in texts:
        try:
            counted.append(count_tokens(*row))
        except Exception as err:  # a tokenizer's own failure on one row must not stop the file
            counted.append(Problem("tokenizer_error", f"{type(err).__name__}: {err}"[:500]))
    return counted


def _own_key(own_id) -> bytes:
    """A row's own id as a 16-byte digest (ids compare as text: 7 and "7" are the same id)."""
    return hashlib.blake2b(str(own_id).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class IngestStream:
    """The validated rows of one file, read as they are taken: ``("sample", row)`` and ``("quarantine", row)``
    items, in file order. Opening it reads the first row, so a file that cannot be read at all raises
    ``IngestError`` then; ``notes`` are what was noticed about the file as a whole.

    Rows are decided ``BATCH_ROWS`` at a time (one tokenizer call per batch with ``count_batch``); what stays
    for the whole file is compact per-row state (data.seen): each sample id and own id with its first line.
    """

    def __init__(
        self,
        source: DataSource,
        count_tokens: TokenCounter,
        max_tokens: int,
        labels: LabelRule = LabelRule(),
        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
        count_batch: BatchCounter | None = None,
    ):
        self.source, self.labels, self.max_tokens = source, labels, max_tokens
        self.dataset, self.path = source.name, source.path
        self.count_tokens, self.count_batch = count_tokens, count_batch
        rows = open_rows(source, max_row_bytes)
        self.rows, self.notes = rows.rows, rows.notes
        self.seen_content = FirstSeen(10)  # sample id (its 10 bytes) -> first line
        self.seen_ids = FirstSeen(16, payload_bytes=10)  # own id digest -> first line, sample id

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        batch: list[RawRow] = []
        size = 0
        for row in self.rows:
            batch.append(row)
            size += len(row.raw)
            if len(batch) >= BATCH_ROWS or size >= BATCH_CHARS:
                yield from self._decide(batch)
                batch, size = [], 0
        yield from self._decide(batch)

    def _decide(self, batch: list[RawRow]) -> Iterator[tuple[str, dict]]:
        checked = [_check(row, self.source, self.labels, self.dataset) for row in batch]
        cands = [c for c in checked if isinstance(c, _Candidate)]
        for c, n_tokens in zip(cands, _count(cands, self.count_tokens, self.count_batch), strict=True):
            c.n_tokens = n_tokens
            if not isinstance(n_tokens, Problem) and n_tokens <= self.max_tokens:
                parts = (c.prompt, c.response, c.text if c.prompt is None else None, c.label)
                c.sample_id = content_hash(*parts, *(() if c.text_pair is None else (c.text_pair,)))
                c.key = bytes.fromhex(c.sample_id)
                if (own_id := _field(c.row.record, self.source.id)) is not None:
                    c.own_key = _own_key(own_id)
        kept = [c for c in cands if c.sample_id is not None]
        self.seen_content.preload(c.key for c in kept)
        self.seen_ids.preload(c.own_key for c in kept if c.own_key is not None)
        for row, c in zip(batch, checked, strict=True):
            problem = c if isinstance(c, Problem) else self._problem(c)
            if problem is None:
                yield "sample", self._sample(c)
            else:
                yield "quarantine", quarantine_row(self.dataset, self.path, row.line, problem, row.raw)

    def _problem(self, c: _Candidate) -> Problem | None:
        """The checks after tokenizing, in file order: length, an own id reused for other content, exact duplicates."""
        if isinstance(c.n_tokens, Problem):
            return c.n_tokens
        if c.sample_id is None:
            return Problem("too_long", f"{c.n_tokens} tokens > max_tokens {self.max_tokens}")
        if c.own_key is not None:
            first = self.seen_ids.first_or_add(c.own_key, c.row.line, c.key)
            if first is not None and first[1] != c.key:
                own_id = _field(c.row.record, self.source.id)
                return Problem("duplicate_id", f"id {own_id!r} with different content (first at line {first[0]})")
        if (first := self.seen_content.first_or_add(c.key, c.row.line)) is not None:
            return Problem("duplicate", f"exact duplicate of line {first[0]}")
        return None

    def _sample(self, c: _Candidate) -> dict:
        return {
            "dataset": self.dataset,
            "sample_id": c.sample_id,
            "shard": None,
            "domain": c.domain,
            "label": c.label,
            "prompt": c.prompt,
            "response": c.response,
            "text": c.text,
            "text_pair": c.text_pair,
            "n_tokens": c.n_tokens,
            "source": self.path,
            "line": c.row.line,
            "record": c.record,
        }


def ingest_source(
    source: DataSource,
    count_tokens: TokenCounter,
    max_tokens: int,
    labels: LabelRule = LabelRule(),
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    count_batch: BatchCounter | None = None,
) -> IngestResult:
    """Validate every row of one file: samples with content-hash ids, and quarantine rows with reasons.

    ``count_tokens(prompt, response, text)`` gives the length the sample will have when scored; an
    exception it raises quarantines the row (``tokenizer_error``). Holds the whole file's samples: for
    small files and tests; ingest itself streams (``IngestStream``, data.shards).
    """
    stream = IngestStream(source, count_tokens, max_tokens, labels, max_row_bytes, count_batch)
    result = IngestResult(source.name, notes=stream.notes)
    for kind, row in stream:
        (result.samples if kind == "sample" else result.quarantine).append(row)
    return result


def shard_samples(samples: list[dict], dataset: str, shard_size: int) -> list[tuple[str, list[dict]]]:
    """Fixed-size shards in file order, named by dataset, index and a hash of their sample ids (``ShardKey``)."""
    shards = []
    for start in range(0, len(samples), shard_size):
        chunk = samples[start : start + shard_size]
        name = ShardKey.of(dataset, start // shard_size, (s["sample_id"] for s in chunk)).name
        shards.append((name, [{**s, "shard": name} for s in chunk]))
    return shards
