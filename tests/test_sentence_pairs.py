"""Sentence pairs: ingest's ``text_pair`` field, the tokenizer's pair call (token type ids), pair embeddings."""

from __future__ import annotations

import json

import numpy as np

from gradsift.data.ingest import ingest_source
from gradsift.models.adapter import adapter
from gradsift.models.loading import load_tokenizer, minilm_path
from gradsift.schemas.config import DataSource


def _pairs_file(tmp_path):
    rows = [
        {"premise": "A man plays a guitar.", "hypothesis": "A person makes music.", "label": "entailment"},
        {"premise": "A dog runs in a park.", "label": "neutral"},  # no hypothesis
        {"premise": "Two kids swim.", "hypothesis": "   ", "label": "contradiction"},  # blank hypothesis
    ]
    path = tmp_path / "nli.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return DataSource(path=str(path), text="premise", text_pair="hypothesis")


def test_a_missing_or_blank_pair_field_quarantines_the_row(tmp_path):
    tokenizer = load_tokenizer(str(minilm_path()))
    counter = adapter("classification")
    result = ingest_source(
        _pairs_file(tmp_path),
        lambda *row: counter.count_tokens(tokenizer, *row),
        128,
        count_batch=lambda rows: counter.count_tokens_batch(tokenizer, rows),
    )
    assert [s["text_pair"] for s in result.samples] == ["A person makes music."]
    assert [s["text"] for s in result.samples] == ["A man plays a guitar."]
    assert [(q["line"], q["reason"]) for q in result.quarantine] == [(2, "missing_field"), (3, "empty_text")]
    assert "hypothesis" in result.quarantine[0]["detail"]


def test_the_pair_reaches_the_tokenizer_as_a_pair():
    tokenizer = load_tokenizer(str(minilm_path()))
    row = {"dataset": "d", "sample_id": "s", "text": "A man plays.", "text_pair": "A person acts.", "label": "a"}
    pair = adapter("classification").encode(row, tokenizer, {"a": 0})
    joined = adapter("classification").encode({**row, "text": "A man plays. A person acts.", "text_pair": None},
                                               tokenizer, {"a": 0})  # fmt: skip
    assert pair.token_type_ids is not None and set(pair.token_type_ids) == {0, 1}
    assert joined.token_type_ids is None
    assert pair.input_ids.count(tokenizer.sep_token_id) == 2 and joined.input_ids.count(tokenizer.sep_token_id) == 1
    assert adapter("classification").count_tokens(tokenizer, None, None, row["text"], row["text_pair"]) == len(
        pair.input_ids
    )


def test_frozen_embeddings_of_a_pair_differ_from_the_joined_text(tmp_path):
    from gradsift.models.embeddings import cached_embeddings

    texts, pairs = ["A man plays a guitar.", "A man plays a guitar."], ["A person makes music.", None]
    joined = ["A man plays a guitar. A person makes music."]
    emb = cached_embeddings(tmp_path, str(minilm_path()), texts, pairs=pairs)
    again = cached_embeddings(tmp_path, str(minilm_path()), texts[:1], pairs=pairs[:1])  # from the cache
    flat = cached_embeddings(tmp_path, str(minilm_path()), joined)
    np.testing.assert_array_equal(emb[:1], again)
    assert not np.allclose(emb[0], flat[0], atol=1e-3) and not np.allclose(emb[0], emb[1], atol=1e-3)


def test_finetune_batches_carry_the_token_type_ids_to_the_model(tiny_bert):
    """collate pads the segment ids; the classifier's logits see them (fine-tune mode, the engine's forward)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gradsift.data.batching import collate
    from gradsift.models.adapter import forward_logits

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    rows = [{"dataset": "d", "sample_id": str(i), "text": t, "text_pair": p, "label": "a"}
            for i, (t, p) in enumerate((("A man plays.", "A person acts."), ("Two dogs run fast.", "Animals move.")))]  # fmt: skip
    batch = collate([adapter("classification").encode(r, tokenizer, {"a": 0}) for r in rows], tokenizer.pad_token_id)
    assert batch.token_type_ids is not None and batch.token_type_ids.shape == batch.input_ids.shape
    assert (batch.token_type_ids[batch.attention_mask == 0] == 0).all() and batch.token_type_ids.sum() > 0
    with torch.no_grad():
        paired = forward_logits(model, batch)
        flat = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(paired, flat)


def test_the_finetune_proxy_feeds_the_pair_as_a_pair(tiny_bert, tmp_path):
    """finetune mode's own path (encode_rows, cut to max_length, then HFProxy's forward): the segment ids stay aligned
    with the cut tokens and reach the model (the logits differ from the same tokens as one segment)."""
    import dataclasses

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gradsift.schemas.train import TrainConfig
    from gradsift.training.proxy import HFProxy, TrainData, encode_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    cfg = TrainConfig(data={"path": str(tmp_path / "pairs.jsonl")}, model=tiny_bert, mode="finetune", max_length=9)
    pairs = (("A man plays a guitar.", "A person makes music."), ("Two dogs run.", "Animals move fast outside."))
    rows = [
        {"dataset": "d", "sample_id": str(i), "text": t, "text_pair": p, "label": "a"} for i, (t, p) in enumerate(pairs)
    ]
    joined = [{**r, "text": f"{r['text']} {r['text_pair']}", "text_pair": None} for r in rows]
    items = encode_rows(cfg, TrainData(rows, {"a": 0}), tokenizer, "classification")
    flat = encode_rows(cfg, TrainData(joined, {"a": 0}), tokenizer, "classification")
    assert all(len(it.token_type_ids) == len(it.input_ids) == 9 for it in items) and sum(items[1].token_type_ids) > 0
    assert all(it.token_type_ids is None for it in flat) and [it.input_ids for it in flat] != [
        it.input_ids for it in items
    ]
    untyped = [dataclasses.replace(it, token_type_ids=None) for it in items]  # the same tokens, one segment
    with torch.no_grad():
        paired = HFProxy(model, tokenizer, "classification", items, lora=False).logits(np.arange(2))[0]
        one_segment = HFProxy(model, tokenizer, "classification", untyped, lora=False).logits(np.arange(2))[0]
    assert paired.shape == (2, 2) and not torch.allclose(paired, one_segment)
