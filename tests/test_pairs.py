"""Preference pairs in every common layout, bad rows quarantined, and truncation that keeps the prompt end
and the response start (tasks.pairs, tasks.entanglement.encode_pair, `gradsift analyze pairs`)."""

from __future__ import annotations

import gzip
import json

import pytest

from gradsift.data.batching import IGNORE_INDEX
from gradsift.data.pairs import BadRecord, parse_pair
from gradsift.data.reasons import REASONS
from gradsift.models.loading import byte_tokenizer
from gradsift.schemas.config import AnalyzeConfig
from gradsift.schemas.influence import PairsConfig
from gradsift.signals.entanglement import encode_pair

HH = "\n\nHuman: hi\n\nAssistant:"
CHAT_PROMPT = "<|user|>\nhi\n<|assistant|>\n"
LONG_PROMPT = "\n\nHuman: " + "".join(f"tell me about item {i}, " for i in range(40)) + "END\n\nAssistant:"

# (record, expected (prompt, chosen, rejected)) in each layout
GOOD = [
    ({"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}, ("What is 2+2?", " 4", " 5")),
    ({"chosen": HH + " hello", "rejected": HH + " go away"}, (HH, " hello", " go away")),
    (
        {
            "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "hello"},
            "rejected": {"from": "gpt", "value": "meh"},
        },
        ("<|system|>\nbe nice\n" + CHAT_PROMPT, "hello", "meh"),
    ),
    (
        {"conversations": [{"from": "user", "value": "hi"}], "chosen": "hello", "rejected": "meh"},
        (CHAT_PROMPT, "hello", "meh"),
    ),
    (
        {
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "meh"}],
        },
        (CHAT_PROMPT, "hello", "meh"),
    ),
    (
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": "meh",
        },
        (CHAT_PROMPT, "hello", "meh"),
    ),
    (
        {"prompt": LONG_PROMPT, "chosen": " short", "rejected": " " + "no " * 30},
        (LONG_PROMPT, " short", " " + "no " * 30),
    ),
]

# (JSONL line, reason category)
BAD = [
    (json.dumps({"prompt": "Q", "rejected": "b"}), "missing_field"),
    (json.dumps({"prompt": "Q", "chosen": 7, "rejected": "b"}), "wrong_type"),
    (
        json.dumps({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt"}, "rejected": "b"}),
        "missing_field",
    ),
    (json.dumps({"prompt": "Q", "chosen": "a", "rejected": "   "}), "empty_text"),
    ('{"prompt": "Q", "chosen": ', "invalid_json"),
    ("[1, 2, 3]", "not_an_object"),
    (json.dumps({"chosen": "Human: hi there", "rejected": "Human: hi\n\nAssistant: x"}), "no_assistant_turn"),
    (json.dumps({"chosen": HH + " a", "rejected": "\n\nHuman: bye\n\nAssistant: b"}), "mismatched_prompt"),
]


@pytest.mark.parametrize(("record", "want"), GOOD)
def test_every_layout_parses(record, want):
    assert parse_pair(record, PairsConfig()) == want


def test_configured_field_names_and_layout():
    pc = PairsConfig(prompt="question", chosen="good", rejected="bad", conversations="turns")
    assert parse_pair({"question": "Q", "good": "a", "bad": "b"}, pc) == ("Q", "a", "b")
    assert parse_pair({"turns": [{"role": "user", "content": "hi"}], "good": "a", "bad": "b"}, pc)[0] == CHAT_PROMPT
    with pytest.raises(BadRecord, match="^wrong_type: 'chosen' is a string") as err:
        parse_pair({"chosen": HH + " a", "rejected": HH + " b"}, PairsConfig(layout="messages"))
    assert err.value.reason == "wrong_type" and err.value.detail.startswith("'chosen' is a string")
    with pytest.raises(ValueError, match="extra"):
        PairsConfig(chosen_field="x")


@pytest.mark.parametrize(("line", "category"), [b for b in BAD if b[0].startswith("{") and b[1] != "invalid_json"])
def test_bad_rows_raise_their_category(line, category):
    with pytest.raises(BadRecord) as err:
        parse_pair(json.loads(line), PairsConfig())
    assert err.value.reason == category and category in REASONS and err.value.detail


def test_truncation_keeps_prompt_end_and_response_start():
    tok = byte_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    n = 64
    long_answer = " " + " ".join(f"w{i}" for i in range(60))
    w, r, cut = encode_pair(tok, LONG_PROMPT, long_answer, " no", n)
    assert cut and len(w.input_ids) == n and len(r.input_ids) <= n
    n_prompt = sum(t == IGNORE_INDEX for t in w.target)
    assert n_prompt == n // 2  # a long response leaves the prompt half the budget
    assert w.input_ids[0] == tok.bos_token_id  # BOS, then the END of the prompt
    assert w.input_ids[1:n_prompt] == ids(LONG_PROMPT)[-(n_prompt - 1) :]
    assert w.input_ids[n_prompt:] == ids(long_answer)[: n - n_prompt]  # the START of the response
    assert w.target[n_prompt:] == w.input_ids[n_prompt:]  # targets stay on the kept response tokens
    assert r.input_ids[:n_prompt] == w.input_ids[:n_prompt]  # both responses see the same prompt tokens
    assert r.input_ids[n_prompt:] == ids(" no") + [tok.eos_token_id]
    # a short response stays whole; the prompt keeps what is left
    w, r, cut = encode_pair(tok, LONG_PROMPT, " ok", " no way", n)
    assert cut and len(r.input_ids) == n and r.input_ids[-1] == tok.eos_token_id
    assert sum(t == IGNORE_INDEX for t in r.target) == n - len(ids(" no way")) - 1
    # short pairs are not cut
    w, _, cut = encode_pair(tok, "Q", " a", " b", n)
    assert not cut and w.input_ids == [tok.bos_token_id, *ids("Q"), *ids(" a"), tok.eos_token_id]


def _write(path, good, bad):
    lines = [json.dumps(rec) for rec, _ in good] + [""] + [line for line, _ in bad]
    path.write_text("\n".join(lines) + "\n")
    good_lines = list(range(1, len(good) + 1))
    bad_lines = list(range(len(good) + 2, len(good) + 2 + len(bad)))
    return good_lines, bad_lines


def test_analyze_pairs_cli_every_layout_and_bad_rows(tmp_path, prefect_harness, ray_local):
    from typer.testing import CliRunner

    from gradsift.cli import app
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store

    data = tmp_path / "prefs.jsonl"
    good_lines, bad_lines = _write(data, GOOD, BAD)
    store = tmp_path / "store"
    try:
        out = CliRunner().invoke(app, ["analyze", "pairs", str(data), "--store", str(store), "--max-tokens", "64"])
    finally:  # the flow set Prefect's logging up again on the runner's stream, closed now: back to the real one
        from prefect.logging.configuration import setup_logging

        setup_logging(incremental=False)
    assert out.exit_code == 0, out.output
    assert "Traceback" not in out.output and "Error" not in out.output, out.output
    said = " ".join(out.output.split())  # rich wraps at the terminal's width
    assert f"{len(GOOD)} pairs scored, {len(BAD)} rows quarantined" in said, said
    assert "1 of 7 pairs truncated to 64 tokens (prompt end and response start kept)" in said, said
    st = Store(store)
    runs = query(st, "SELECT status FROM runs").column("status").to_pylist()
    assert runs == ["completed"]
    scores = query(st, "SELECT line, truncated, condition_ratio FROM pair_scores ORDER BY line").to_pylist()
    assert [s["line"] for s in scores] == good_lines
    assert [s["line"] for s in scores if s["truncated"]] == [len(GOOD)]  # the long-prompt pair
    quarantine = query(st, "SELECT dataset, line, reason, detail FROM quarantine ORDER BY line").to_pylist()
    assert [q["line"] for q in quarantine] == bad_lines
    for q, (_, category) in zip(quarantine, BAD, strict=True):
        assert q["reason"] == category and q["detail"] and q["dataset"] == "prefs", q


def test_analyze_pairs_cli_fails_clearly_without_a_usable_pair(tmp_path):
    from typer.testing import CliRunner

    from gradsift.cli import app

    data = tmp_path / "nothing.jsonl"
    _write(data, [], BAD)
    out = CliRunner().invoke(app, ["analyze", "pairs", str(data), "--store", str(tmp_path / "store")])
    text = " ".join(out.output.split())  # rich wraps long lines
    assert out.exit_code == 2 and "Traceback" not in text, text
    assert f"{data}: no usable preference pair: all {len(BAD)} rows quarantined" in text


def test_hh_rlhf_pairs_keep_their_prompt(shared_data, tmp_path):
    """On real hh-rlhf dialogues: few rows quarantined, and truncated pairs keep prompt tokens."""
    from gradsift.flows.analyze import pair_rows

    path = shared_data / "hh_rlhf_harmless/test.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        n_rows = sum(1 for line in fh if line.strip())
    cfg = AnalyzeConfig(store=str(tmp_path / "store"), data=str(path), pairs={})
    rows, bad = pair_rows(cfg)
    assert len(rows) + len(bad) == n_rows and len(bad) < 0.01 * n_rows
    assert all(q["reason"] in REASONS and q["detail"] for q in bad)
    tok, n = byte_tokenizer(), 512
    n_cut = 0
    for _, prompt, chosen, rejected in rows[:300]:
        w, _, cut = encode_pair(tok, prompt, chosen, rejected, n)
        n_prompt = sum(t == IGNORE_INDEX for t in w.target)
        assert n_prompt >= min(n // 2, len(tok(prompt, add_special_tokens=False)["input_ids"]) + 1)
        n_cut += cut
    assert n_cut > 0


def test_analyze_flow_without_a_usable_pair_fails_the_run(tmp_path, prefect_harness, ray_local):
    from gradsift.data.pairs import NoUsableRows
    from gradsift.flows.analyze import analyze_flow
    from gradsift.storage.store import Store

    data = tmp_path / "nothing.jsonl"
    _write(data, [], BAD[:2])
    cfg = AnalyzeConfig(store=str(tmp_path / "store"), data=str(data), pairs={})
    with pytest.raises(NoUsableRows, match="no usable preference pair: all 2 rows quarantined"):
        analyze_flow(cfg)
    assert [r["status"] for r in Store(cfg.store).runs()] == ["failed"]
