"""Ingest: formats, field mappings, validation reasons, whole-file errors, sharding."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradsift.data.ingest import IngestError, LabelRule, ingest_source, shard_samples
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


def _mixed_rows(n: int, pad: str = "") -> list[bytes]:
    """Prompt/response rows with ids; from row 24 on, 9 of every 23 are bad or duplicates: a cut JSON line, a
    missing field, an empty response, an exact duplicate (of 4 rows before, of 929 rows before), an id reused
    for other content (5 and 930 rows before), over-long (for ``max_tokens`` 200 + len(pad)), a tokenizer error."""
    lines: list[bytes] = []
    for i in range(n):
        row = {"id": i, "prompt": f"Q{i}: ", "response": f"answer {i} {pad}" + "x" * (i % 50), "topic": f"t{i % 3}"}
        kind = i % 23 if i >= 23 else -1
        if kind == 0:
            lines.append(b'{"prompt": "cut')
            continue
        if kind == 1:
            row = {"id": i, "question": "?"}
        elif kind == 2:
            row["response"] = "  "
        elif kind == 3:
            row = {**json.loads(lines[i - 4]), "id": f"dup{i}"}
        elif kind == 4:
            row["id"] = i - 5
        elif kind == 5:
            row["response"] = "y" * 300 + pad
        elif kind == 6:
            row["response"] = f"boom {i}"
        elif kind == 7 and i > 929:
            row = {**json.loads(lines[i - 929]), "id": f"far{i}"}
        elif kind == 8 and i > 930:
            row["id"] = i - 930
        lines.append(json.dumps(row).encode())
    return lines


def _count_or_boom(prompt, response, text):
    if "boom" in text:
        raise ValueError("no boom")
    return len(text)


def _count_batch(rows):
    return [_count_or_boom(*row) for row in rows]  # one "boom" fails the batch: ingest counts it row by row


def _stream_to_parts(path, parts, max_tokens=200):
    from gradsift.data.ingest import IngestStream
    from gradsift.data.shards import write_source

    source = DataSource(path=str(path), domain="topic")
    stream = IngestStream(source, _count_or_boom, max_tokens, count_batch=_count_batch)
    return write_source(stream, "m", parts, 256, "m-quarantine")


def _digest(rows: list[dict]) -> str:
    import hashlib

    rows = [{**r, "source": "P"} for r in rows]  # the file's path differs between runs
    assert all(r.pop("text_pair", None) is None for r in rows)  # single texts: the pair column (added later) is null
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def test_streamed_ingest_writes_the_whole_file_ingests_shards(tmp_path, monkeypatch):
    """3,000 rows into 8 shards a shard at a time: the names, samples and quarantine rows a whole-file ingest gave
    (the expected values were computed with it, before ingest streamed), across many merges of the seen-ids."""
    from gradsift.data import seen, shards
    from gradsift.storage.store import Parts

    monkeypatch.setattr(seen.FirstSeen, "RECENT", 16)  # merge into the sorted arrays every few batches
    monkeypatch.setattr(shards, "QUARANTINE_BATCH_ROWS", 100)  # the quarantine part in 11 row groups
    path = write_jsonl(tmp_path / "m.jsonl", _mixed_rows(3000))
    parts = Parts(tmp_path / "parts")
    written = _stream_to_parts(path, parts)
    expected_names = ["m-00000-66fc29d441", "m-00001-9b19e9285e", "m-00002-9b6ced7f06", "m-00003-553692358a",
                      "m-00004-1fe1a821a8", "m-00005-1e23486a58", "m-00006-3b0833ebb9", "m-00007-271b1df228"]  # fmt: skip
    assert written.shards == expected_names
    assert [p.stem for p in parts.parts("samples")] == expected_names
    samples = [r for name in expected_names for r in pq.read_table(parts.part_path("samples", name)).to_pylist()]
    quarantine = pq.read_table(parts.part_path("quarantine", "m-quarantine")).to_pylist()
    assert (written.samples, written.quarantined, len(samples), len(quarantine)) == (1910, 1090, 1910, 1090)
    assert _digest(samples) == "d145bae3c9829870"  # computed with the whole-file ingest, before it streamed
    reasons = Counter(q["reason"] for q in quarantine)  # 130 of each planted kind; the duplicates of both distances
    assert reasons == {"duplicate": 220, "duplicate_id": 220, "invalid_json": 130, "missing_field": 130,
                       "empty_text": 130, "too_long": 130, "tokenizer_error": 130}  # fmt: skip
    assert _digest(quarantine) == "6a862715c6ea812a"  # the same rows with reason and detail apart
    assert pq.ParquetFile(parts.part_path("quarantine", "m-quarantine")).num_row_groups == 11

    whole = ingest_source(DataSource(path=str(path), domain="topic"), _count_or_boom, 200)  # row by row
    assert [(name, rows) for name, rows in shard_samples(whole.samples, "m", 256)] == [
        (name, [r for r in samples if r["shard"] == name]) for name in expected_names
    ]
    assert whole.quarantine == quarantine


def test_streamed_ingest_memory_does_not_grow_with_the_file(tmp_path):
    """Peak Python memory of ingesting 20,000 rows of ~300 characters is within 1.5x of 2,000 rows' (measured:
    2.6 vs 1.7 MB) and grows by under 64 bytes a row (~45: each sample id and own id with its first line); a
    whole-file ingest grows by 1.6 KB a row (32 vs 3.4 MB)."""
    import tracemalloc

    from gradsift.storage.store import Parts

    pad = "lorem ipsum dolor sit amet " * 8
    _stream_to_parts(write_jsonl(tmp_path / "warm.jsonl", _mixed_rows(300, pad)), Parts(tmp_path / "warm"))  # imports
    peaks = []
    for n in (2_000, 20_000):
        path = write_jsonl(tmp_path / f"r{n}.jsonl", _mixed_rows(n, pad))
        tracemalloc.start()
        written = _stream_to_parts(path, Parts(tmp_path / f"parts{n}"), max_tokens=200 + len(pad))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert written.samples + written.quarantined == n and written.samples > 0.6 * n
    message = f"peak {peaks[1] / 1e6:.2f} MB for 20k rows vs {peaks[0] / 1e6:.2f} MB for 2k"
    assert peaks[1] < 1.5 * peaks[0] and peaks[1] - peaks[0] < 64 * 18_000, message


def test_ingest_sources_runs_without_prefect_and_a_rerun_keeps_no_stale_parts(tmp_path):
    """The stage's work as a plain function; parts an interrupted attempt left in staging are gone after a rerun."""
    import logging

    from gradsift.flows.stages import ingest_sources
    from gradsift.schemas.config import IngestConfig, ModelConfig, RunConfig
    from gradsift.schemas.tables import QUARANTINE, SAMPLES
    from gradsift.storage.store import Store

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}: ", "response": f"A{i}"} for i in range(40)] + [b"{"])
    config = RunConfig(
        store=str(tmp_path / "store"),
        model=ModelConfig(name_or_path="tiny"),
        ingest=IngestConfig(sources=[DataSource(path=str(path))], shard_size=16),
    )
    staging = Store(config.store).ensure().staging("score-test")
    staging.write_part("samples", "d-00003-0123456789", SAMPLES.empty_table())  # left by an interrupted attempt
    staging.write_part("quarantine", "d-0123456789ab", QUARANTINE.empty_table())
    info = ingest_sources(config, staging, logging.getLogger("test"))
    assert (info.samples, info.quarantined, len(info.shards)) == (40, 1, 3)
    assert [p.stem for p in staging.parts("samples")] == info.shards
    assert staging.count_rows("samples") == 40 and len(staging.parts("quarantine")) == 1
    assert staging.read("quarantine")["reason"].to_pylist() == ["invalid_json"]


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_batched_token_counts_are_the_row_by_row_counts(task):
    from transformers import AutoTokenizer

    from gradsift.models.adapter import adapter
    from gradsift.models.loading import load_tokenizer, minilm_path

    rows = [(None, None, "plain text"), ("Q: ", "an answer", "Q: an answer"), ("", "only a response", "only a response"),
            (None, None, "ünïcödé 🙂 \u200b\t mixed"), ("<|user|>\nhi\n<|assistant|>\n", "hello!", "x"), (None, None, "long " * 700)]  # fmt: skip
    if task == "classification":  # sentence pairs mixed with single texts, one pair past MiniLM's stored 128 limit
        rows[1:1] = [(None, None, "a premise", "its hypothesis"), (None, None, "long " * 100, "pair " * 100)]
    counter = adapter(task)
    slow = AutoTokenizer.from_pretrained(minilm_path(), use_fast=False, local_files_only=True)
    # fresh tokenizers, counted in batches first: MiniLM's tokenizer.json truncates and pads to 128 until the
    # wrapper's first call turns that off; the counts must never see it
    for tokenizer in (load_tokenizer("tiny"), load_tokenizer(str(minilm_path())), slow):
        assert counter.count_tokens_batch(tokenizer, rows) == [counter.count_tokens(tokenizer, *row) for row in rows]
        assert counter.count_tokens_batch(tokenizer, []) == []
    assert counter.count_tokens(tokenizer, None, None, "long " * 700) > 512  # the batch above really was long


def test_first_seen_matches_a_dict_across_merges(monkeypatch):
    """data.seen against a plain dict: keys and payloads ending in NUL bytes, lines past 2**32, many merges."""
    import random

    from gradsift.data.seen import FirstSeen

    monkeypatch.setattr(FirstSeen, "RECENT", 7)
    rng = random.Random(1)
    keys = [rng.randbytes(9) + bytes([rng.choice([0, 1, 255])]) for _ in range(300)] + [b"\0" * 10, b"\1" + b"\0" * 9]
    for payload_bytes in (0, 10):
        seen, expected, line = FirstSeen(10, payload_bytes), {}, 0
        for _ in range(300):
            batch = [rng.choice(keys) for _ in range(13)]
            seen.preload(batch)
            for key in batch:
                line += rng.choice([1, 1, 1 << 31])
                payload = rng.randbytes(payload_bytes)[:-1] + b"\0" if payload_bytes else b""
                assert seen.first_or_add(key, line, payload) == expected.get(key)
                expected.setdefault(key, (line, payload))
        assert len(seen) == len(expected) and seen._lines.dtype == "int64"


def test_the_label_set_is_fixed_by_the_config(tiny_bert):
    from gradsift.flows.stages import label_rule
    from gradsift.schemas.config import ModelConfig

    def rule(**model):
        return label_rule(ModelConfig(name_or_path=tiny_bert, **model))

    assert rule(labels=["neg", "pos"]) == ("classification", LabelRule(True, ("neg", "pos")))
    assert rule(num_labels=3) == ("classification", LabelRule(True, ("0", "1", "2")))
    assert rule() == ("classification", LabelRule(True, ("0", "1")))  # the folder's own 2-class head
    assert rule(task="classification") == ("classification", LabelRule(True, None))  # a proxy: the data's labels
    assert label_rule(ModelConfig()) == ("causal_lm", LabelRule())  # tiny: a causal LM
    assert ModelConfig(name_or_path=tiny_bert, labels=["a", "b"]).num_labels == 2
    for bad, message in [({"labels": ["a", "a"]}, "distinct"), ({"labels": ["a"], "num_labels": 2}, "does not match"),
                         ({"task": "causal_lm", "num_labels": 2}, "takes no num_labels"),
                         ({"num_labels": 2}, "'tiny' is a causal LM")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ModelConfig(**bad)
    rule = LabelRule(True, ("neg", "pos"))
    assert rule.problem("pos", "label") is None
    assert rule.problem("neutral", "label").reason == "unknown_label"
    assert rule.problem(None, "label").reason == "missing_label"
