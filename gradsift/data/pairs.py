"""Preference-pair records in the common layouts -> (prompt, chosen, rejected) texts (no prefect or ray).

Layouts (``PairsConfig.layout``; ``auto`` picks one per row):

- ``prompt``: a prompt string and chosen/rejected strings (or one assistant turn each);
- ``hh``: chosen and rejected are full hh-rlhf dialogues, split at the last "\\n\\nAssistant:"; both must
  share the text before it;
- ``conversations``: ``conversations`` is a list of {from, value} turns (from: human, user, system, gpt,
  assistant), chosen/rejected one {from, value} turn or a string;
- ``messages``: chosen/rejected are full [{role, content}] lists that share every turn but the last, or
  ``prompt`` is a message list and chosen/rejected its continuations (message lists, one turn or strings).

A turn may spell its keys {from, value} or {role, content}. Chat turns become text as ingest's
``render_messages`` renders them. A row that does not fit raises ``BadRecord``: its ``reason`` (one of
data.reasons' categories) and ``detail`` become the quarantine row's.
"""

from __future__ import annotations

from typing import Any

from gradsift.data.ingest import IngestError, render_messages
from gradsift.data.reasons import BadRow
from gradsift.schemas.influence import PairsConfig

ROLES = {
    "human": "user",
    "user": "user",
    "system": "system",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
"""Role names of the common layouts -> the roles turns are rendered with (others are kept as they are)."""

Turn = tuple[str, str]  # (role, text)

ASSISTANT = "\n\nAssistant:"


def split_dialogue(text: str) -> tuple[str, str]:
    """An hh-rlhf dialogue -> (everything up to and including the last 'Assistant:', the last reply)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in the dialogue")
    cut = i + len(ASSISTANT)
    return text[:cut], text[cut:]


class BadRecord(BadRow):
    """A record an analysis cannot use (a preference pair, a gsm8k problem): ``.problem`` is its quarantine reason."""


class NoUsableRows(IngestError):
    """No row of the file is a usable preference pair."""


_JSON_KIND = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    dict: "an object",
    list: "a list",
    type(None): "null",
}


def _kind(value: Any) -> str:
    return _JSON_KIND.get(type(value), type(value).__name__)


def _get(rec: dict, name: str) -> Any:
    value = rec.get(name)
    if value is None:
        fields = ", ".join(sorted(map(str, rec))) or "none"
        raise BadRecord("missing_field", f"field {name!r} is missing (fields in this row: {fields})")
    return value


def _text(value: Any, where: str, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"{where} is {_kind(value)}, expected {expected}")
    return value


def _turn(value: Any, where: str) -> Turn:
    if not isinstance(value, dict):
        raise BadRecord(
            "wrong_type", f"{where} is {_kind(value)}, expected a {{from, value}} or {{role, content}} object"
        )
    role = next((value[k] for k in ("from", "role") if value.get(k) is not None), None)
    text = next((value[k] for k in ("value", "content") if value.get(k) is not None), None)
    if role is None:
        raise BadRecord("missing_field", f"{where} has no 'from' (or 'role')")
    if text is None:
        raise BadRecord("missing_field", f"{where} has no 'value' (or 'content')")
    role = _text(role, f"the role of {where}")
    text = _text(text, f"the text of {where}")
    return ROLES.get(role.strip().lower(), role), text


def _turns(value: Any, where: str) -> list[Turn]:
    if not isinstance(value, list):
        raise BadRecord("wrong_type", f"{where} is {_kind(value)}, expected a list of turns")
    return [_turn(t, f"turn {i} of {where}") for i, t in enumerate(value)]


def _reply(value: Any, where: str) -> tuple[list[Turn], str]:
    """A chosen/rejected value of a chat layout -> (turns before the reply, the reply's text)."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, dict):
        turns = [_turn(value, where)]
    elif isinstance(value, list):
        turns = _turns(value, where)
        if not turns:
            raise BadRecord("empty_text", f"{where} is an empty list")
    else:
        raise BadRecord("wrong_type", f"{where} is {_kind(value)}, expected a string, a turn or a list of turns")
    if turns[-1][0] != "assistant":
        raise BadRecord("no_assistant_turn", f"the last turn of {where} is from {turns[-1][0]!r}")
    return turns[:-1], turns[-1][1]


def _strip_shared(base: list[Turn], extra: list[Turn]) -> list[Turn]:
    """A continuation that repeats the prompt turns (a full conversation) -> the turns after them."""
    return extra[len(base) :] if base and extra[: len(base)] == base else extra


def _chat(rec: dict, pc: PairsConfig, base: list[Turn], base_name: str | None) -> tuple[str, str, str]:
    (w_extra, chosen), (l_extra, rejected) = (_reply(_get(rec, n), repr(n)) for n in (pc.chosen, pc.rejected))
    w_turns, l_turns = base + _strip_shared(base, w_extra), base + _strip_shared(base, l_extra)
    if w_turns != l_turns:
        raise BadRecord("mismatched_prompt", f"{pc.chosen!r} and {pc.rejected!r} differ before their last turn")
    if not w_turns:
        where = f"{base_name!r} has no turns" if base_name else f"no turns before the last of {pc.chosen!r}"
        raise BadRecord("empty_text", f"no prompt turns ({where})")
    messages = [{"role": role, "content": text} for role, text in w_turns]
    prompt, _ = render_messages([*messages, {"role": "assistant", "content": chosen}])
    return prompt, chosen, rejected


def _prompt_layout(rec: dict, pc: PairsConfig) -> tuple[str, str, str]:
    prompt = _text(_get(rec, pc.prompt), repr(pc.prompt), "a string (or use layout messages)")
    out = [prompt]
    for name in (pc.chosen, pc.rejected):
        extra, text = _reply(_get(rec, name), repr(name))
        if extra:
            raise BadRecord(
                "wrong_type", f"{name!r} holds {len(extra) + 1} turns; with a string prompt it must be one reply"
            )
        out.append(text)
    return out[0], out[1], out[2]


def _hh_layout(rec: dict, pc: PairsConfig) -> tuple[str, str, str]:
    hint = f"a full dialogue string (hh layout: no {pc.prompt!r} or {pc.conversations!r} field in this row)"
    parts = []
    for name in (pc.chosen, pc.rejected):
        text = _text(_get(rec, name), repr(name), hint)
        try:
            parts.append(split_dialogue(text))
        except ValueError:
            raise BadRecord("no_assistant_turn", f"{name!r} has no {ASSISTANT!r} turn to split at") from None
    (prompt, chosen), (other, rejected) = parts
    if prompt != other:
        raise BadRecord(
            "mismatched_prompt", f"{pc.chosen!r} and {pc.rejected!r} differ before their last Assistant turn"
        )
    return prompt, chosen, rejected


def detect_layout(rec: dict, pc: PairsConfig) -> str:
    """The layout ``auto`` reads a row with."""
    if rec.get(pc.conversations) is not None:
        return "conversations"
    prompt = rec.get(pc.prompt)
    if prompt is not None:
        return "messages" if isinstance(prompt, list) else "prompt"
    if any(isinstance(rec.get(n), list) for n in (pc.chosen, pc.rejected)):
        return "messages"
    return "hh"


def parse_pair(rec: dict, pc: PairsConfig) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of one record, or ``BadRecord`` with the reason."""
    layout = detect_layout(rec, pc) if pc.layout == "auto" else pc.layout
    if layout == "prompt":
        prompt, chosen, rejected = _prompt_layout(rec, pc)
    elif layout == "hh":
        prompt, chosen, rejected = _hh_layout(rec, pc)
    elif layout == "conversations":
        base = _turns(_get(rec, pc.conversations), repr(pc.conversations))
        prompt, chosen, rejected = _chat(rec, pc, base, pc.conversations)
    else:
        value = rec.get(pc.prompt)
        base = _turns(value, repr(pc.prompt)) if isinstance(value, list) else []
        if not base:
            for name in (pc.chosen, pc.rejected):
                if not isinstance(_get(rec, name), list):
                    raise BadRecord(
                        "wrong_type",
                        f"{name!r} is {_kind(rec[name])}, expected a message list "
                        f"(messages layout without a {pc.prompt!r} message list)",
                    )
        prompt, chosen, rejected = _chat(rec, pc, base, pc.prompt if base else None)
    for name, text in ((pc.chosen, chosen), (pc.rejected, rejected)):
        if not text.strip():
            raise BadRecord("empty_text", f"the {name!r} response is empty")
    return prompt, chosen, rejected


PAIR_FIELDS = (
    "Map the fields with --prompt-field, --chosen-field, --rejected-field, --conversations-field or pick one with "
    "--layout"
)


def no_rows_message(path: str, quarantine: list[dict], what: str = "preference pair", hint: str = PAIR_FIELDS) -> str:
    """Why a file gave no usable row: its most common quarantine reasons (with one detail each), and what to map."""
    if not quarantine:
        return f"{path}: no records: nothing to analyse"
    counts: dict[str, int] = {}
    example: dict[str, str] = {}
    for q in quarantine:
        counts[q["reason"]] = counts.get(q["reason"], 0) + 1
        example.setdefault(q["reason"], q["detail"])
    top = "; ".join(
        f"{n} x {r} (e.g. {example[r][:100]})" for r, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    )
    return f"{path}: no usable {what}: all {len(quarantine)} rows quarantined ({top}). {hint}"
