"""Why a row is quarantined: a short category (``quarantine.reason``) from one closed list, and the specifics
(``quarantine.detail``: line numbers, counts, field names), so that ``GROUP BY reason`` gives one row per category.

Readers put a ``Problem`` on a row they cannot parse; record checks (ingest, preference pairs, gsm8k problems)
raise ``BadRow``, which carries one. ``quarantine_row`` is the one place a quarantine row is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Reason = Literal[
    # the row's fields
    "missing_field",  # a field the mapping needs is absent (or null)
    "wrong_type",  # a field has the wrong JSON type
    "empty_text",  # a text field, a response or a message list is empty
    "no_assistant_turn",  # a chat or dialogue does not end with the assistant's reply
    "mismatched_prompt",  # a pair's chosen and rejected do not share their prompt
    # parsing the row
    "invalid_json",  # a JSON line does not parse (nested too deep included)
    "not_an_object",  # a JSON record is a list, a string, a number...
    "invalid_record",  # a record that cannot be turned back into JSON (nested too deep)
    "undecodable",  # bytes that are not valid in the file's encoding
    "invalid_text",  # decoded text that is no valid Unicode (a lone surrogate)
    "invalid_csv",  # a CSV/TSV row the csv module refuses (a bare carriage return...)
    "unbalanced_quote",  # a quoted CSV field that never closes; the lines after it are read again
    "wrong_columns",  # a CSV/TSV row with more or fewer cells than the header
    # size and tokens
    "too_long",  # a line over ingest.max_row_bytes, or a sample over model.max_tokens
    "tokenizer_error",  # the tokenizer raised on the row
    # labels
    "missing_label",  # a classifier needs a label and the row has none
    "unknown_label",  # a label outside the run's fixed label set
    # duplicates
    "duplicate_id",  # a repeated id with different content
    "duplicate",  # the same content as an earlier row
    # the file
    "truncated_file",  # a cut .gz: the rows before the cut are kept
    "unreadable_data",  # a corrupt Parquet row group after good ones: the rows before it are kept
    "unreadable_file",  # a file that cannot be read at all (one row at line 0)
    "unreadable_row",  # a row without a record and no reader error (should not happen)
]
REASONS: tuple[str, ...] = get_args(Reason)
"""Every value ``quarantine.reason`` takes."""


@dataclass(frozen=True)
class Problem:
    """What is wrong with one row: its category and the specifics."""

    reason: Reason
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {self.reason!r}; add it to gradsift.data.reasons.Reason")

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class BadRow(ValueError):
    """A record that cannot be used: ``.problem`` (and ``.reason``, ``.detail``) says why."""

    def __init__(self, reason: Reason, detail: str):
        self.problem = Problem(reason, detail)
        super().__init__(str(self.problem))

    @property
    def reason(self) -> Reason:
        return self.problem.reason

    @property
    def detail(self) -> str:
        return self.problem.detail


def text_field(record: dict, name: str, what: str = "field", error: type[BadRow] = BadRow) -> str:
    """The non-blank string ``record[name]``; ``error`` (a ``BadRow``) says which of missing, wrong type or empty
    it is, ``what`` naming the field's role in the message."""
    value = record.get(name)
    if value is None:
        fields = ", ".join(sorted(record)) or "none"
        raise error("missing_field", f"{what} {name!r} is missing (fields in this row: {fields})")
    if not isinstance(value, str):
        raise error("wrong_type", f"{what} {name!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise error("empty_text", f"{what} {name!r} is empty")
    return value


def quarantine_row(dataset: str, source: str, line: int, problem: Problem, raw: str) -> dict:
    """One row of the quarantine table (``raw`` cut to 10,000 characters)."""
    return {
        "dataset": dataset,
        "source": source,
        "line": line,
        "reason": problem.reason,
        "detail": problem.detail,
        "raw": raw[:10_000],
    }
