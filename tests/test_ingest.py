"""Ingest: formats, field mappings, validation reasons, whole-file errors, sharding."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradsift.data.ingest import IngestError, ingest_source, shard_samples
from gradsift.schemas.config import DataSource


def count_chars(prompt, response, text):
    return len(text)


def ingest(path, **fields):
    return ingest_source(DataSource(path=str(path), **fields), count_chars, max_tokens=200)


def write_jsonl(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def test_jsonl_bad_rows_are_quarantined_with_reasons(tmp_path):
    good = [{"prompt": f"Q{i}: ", "response": f"answer {i}"} for i in range(10)]
    bad = [
        {"prompt": "Q: ", "response": "  "},
        {"question": "?", "answer": "!"},
        {"prompt": 3, "response": "x"},
        b'{"prompt": "cut',
        b'{"prompt": "\xff", "response": "x"}',
        {"prompt": "Q: ", "response": "x" * 300},
        {"prompt": "Q0: ", "response": "answer 0"},
        ["not", "an", "object"],
    ]
    result = ingest(write_jsonl(tmp_path / "d.jsonl", good + bad))
    assert len(result.samples) == 10
    got = [(q["line"], q["reason"]) for q in result.quarantine]
    expected = ["empty_text", "missing_field", "wrong_type", "invalid_json", "undecodable", "too_long", "duplicate",
                "not_an_object"]  # fmt: skip
    assert got == list(zip(range(11, 19), expected, strict=True))
    details = [q["detail"] for q in result.quarantine]
    assert "'response' is empty" in details[0] and "303 tokens > max_tokens 200" in details[5]
    assert details[6] == "exact duplicate of line 1" and details[7] == "the record is a JSON list"


def test_sample_id_is_a_content_hash(tmp_path):
    a = ingest(write_jsonl(tmp_path / "a.jsonl", [{"text": "same text"}, {"text": "other"}]))
    b = ingest(write_jsonl(tmp_path / "b.jsonl", [{"text": "other"}, {"text": "same text"}]))
    assert {s["sample_id"] for s in a.samples} == {s["sample_id"] for s in b.samples}
    assert len({s["sample_id"] for s in a.samples}) == 2


def test_duplicate_ids_with_different_content(tmp_path):
    rows = [{"id": 7, "text": "first"}, {"id": 7, "text": "second"}, {"id": 8, "text": "third"}]
    result = ingest(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [s["text"] for s in result.samples] == ["first", "third"]
    assert [(q["reason"], q["detail"]) for q in result.quarantine] == [
        ("duplicate_id", "id 7 with different content (first at line 1)")
    ]


def test_formats_and_field_mapping(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps([{"instruction": "Do", "output": "done", "cat": "x"}]))
    r = ingest(tmp_path / "l.json", prompt="instruction", response="output", domain="cat")
    assert (r.samples[0]["prompt"], r.samples[0]["response"], r.samples[0]["domain"]) == ("Do", "done", "x")

    (tmp_path / "c.csv").write_text('text,label\n"hello, world",1\nbye,0\n')
    r = ingest(tmp_path / "c.csv")
    assert [(s["text"], s["label"]) for s in r.samples] == [("hello, world", "1"), ("bye", "0")]

    (tmp_path / "t.tsv").write_bytes(b"good movie\tpositive\nbad \xff bytes\tnegative\nonly one column\n")
    r = ingest(tmp_path / "t.tsv", columns=["text", "label"], constant_domain="news")
    assert [s["text"] for s in r.samples] == ["good movie"] and r.samples[0]["domain"] == "news"
    assert [q["reason"] for q in r.quarantine] == ["undecodable", "wrong_columns"]
    assert "expected 2 columns" in r.quarantine[1]["detail"]

    pq.write_table(pa.table({"text": ["a parquet row", ""]}), tmp_path / "p.parquet")
    r = ingest(tmp_path / "p.parquet")
    assert len(r.samples) == 1 and r.quarantine[0]["reason"] == "empty_text"


def test_chat_messages(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}
    not_last = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    r = ingest(write_jsonl(tmp_path / "m.jsonl", [chat, not_last]))
    assert r.samples[0]["prompt"] == "<|user|>\nhi\n<|assistant|>\n" and r.samples[0]["response"] == "hello!"
    assert r.quarantine[0]["reason"] == "no_assistant_turn"
    assert "last message must be the assistant" in r.quarantine[0]["detail"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "cannot read file"),
        ("list.json", b'{"not": "a list"}', "must hold a list"),
        ("broken.json", b"[{", "not valid JSON"),
        ("bad.parquet", b"PAR1 nope", "not a readable Parquet file"),
        ("data.xml", b"<a/>", "unknown file type"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IngestError, match=message) as info:
        ingest(path)
    assert name in str(info.value)


def test_shards_are_fixed_size_and_deterministic(tmp_path):
    r = ingest(write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(10)]))
    shards = shard_samples(r.samples, "d", 4)
    assert [len(rows) for _, rows in shards] == [4, 4, 2]
    assert shards == shard_samples(r.samples, "d", 4)
    assert all(row["shard"] == name for name, rows in shards for row in rows)


def test_hostile_corpus_every_bad_row_quarantined_with_its_category(tmp_path):
    from hostile_corpus import check_quarantine, write_corpus

    from gradsift.data.ingest import LabelRule
    from gradsift.flows.stages import _unreadable_file

    corpus = write_corpus(tmp_path, labelled=True)
    samples, quarantine, notes = [], [], []
    for path in corpus.files:
        source = DataSource(path=str(path))
        try:
            result = ingest_source(source, count_chars, 200, LabelRule(required=True, classes=("0", "1")))
        except IngestError as err:
            result = _unreadable_file(source, err)
        samples += result.samples
        quarantine += result.quarantine
        notes += result.notes
    check_quarantine(corpus, samples, quarantine)
    assert any("UTF-16 LE byte-order mark" in n for n in notes) and any("UTF-8 byte-order mark" in n for n in notes)
    assert {s["text"] for s in samples} >= {"utf-16 text one", "utf-8 with a byte-order mark"}


def test_csv_lines_are_physical_lines(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('text,label\n"two\nlines",1\nthird row,0\n\nlast,1,extra\n')
    r = ingest(path)
    assert [(s["text"], s["line"]) for s in r.samples] == [("two\nlines", 2), ("third row", 4)]
    assert [(q["line"], q["reason"]) for q in r.quarantine] == [(6, "wrong_columns")]
