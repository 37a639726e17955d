"""End to end: the scoring flow through Prefect and a local Ray on a model folder the test saves,
checked against plain autograd; bad rows quarantined; a rerun is a no-op."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradsift.flows.score import score_flow
from gradsift.models.loading import LlamaShape, build_llama, byte_tokenizer
from gradsift.schemas.config import RunConfig
from gradsift.storage.catalog import query
from gradsift.storage.store import Store

BAD_ROWS = [
    b'{"prompt": "Question: empty?\\nAnswer: ", "response": ""}',
    b'{"question": "wrong fields", "answer": "1"}',
    b'{"prompt": ["a list"], "response": "x"}',
    b'{"prompt": "unterminated',
    b'{"prompt": "\xc3\x28 invalid utf-8", "response": "x"}',
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    build_llama(LlamaShape(hidden=48, layers=2, heads=4, intermediate=96), seed=3).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [
        json.dumps({"prompt": f"Question: what is {i} plus {i % 7}?\nAnswer: ", "response": f"{i + i % 7}"}).encode()
        for i in range(95)
    ]
    for k, bad in enumerate(BAD_ROWS):  # spread the bad rows through the file
        rows.insert(10 + 17 * k, bad)
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def autograd_reference(model_dir, prompt: str, response: str) -> tuple[float, float]:
    """Per-sample loss (mean over response tokens) and full-gradient L2 norm, the plain way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    labels = torch.tensor([[-100] * len(p) + r])
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    sq = sum(float((param.grad.double() ** 2).sum()) for param in model.parameters() if param.grad is not None)
    return float(loss.detach()), math.sqrt(sq)


def test_score_flow_end_to_end(tmp_path, model_dir, data_file, prefect_harness, ray_local):
    config = RunConfig.model_validate(
        {
            "store": str(tmp_path / "store"),
            "model": {"name_or_path": str(model_dir), "max_tokens": 128},
            "ingest": {"sources": [{"path": str(data_file)}], "shard_size": 16},
            "score": {"engine": {"feature_dim": 256, "micro_batch_size": 8}},
            "ray": {"num_actors": 2},
        }
    )
    result = score_flow(config)
    assert result["status"] == "completed"
    assert (result["ingest"]["samples"], result["ingest"]["quarantined"]) == (95, 5)
    store = Store(config.store)

    assert query(store, "SELECT count(*) AS n FROM scores").column("n")[0].as_py() == 95
    reasons = query(store, "SELECT line, reason, detail FROM quarantine ORDER BY line").to_pylist()
    assert [(r["line"], r["reason"]) for r in reasons] == [
        (11, "empty_text"), (28, "missing_field"), (45, "wrong_type"), (62, "invalid_json"), (79, "undecodable")
    ]  # fmt: skip
    assert all(r["detail"] for r in reasons), reasons

    rows = query(
        store,
        "SELECT prompt, response, loss, grad_norm FROM scores JOIN samples USING (dataset, sample_id) "
        "ORDER BY line LIMIT 6",
    ).to_pylist()
    for row in rows:
        loss, norm = autograd_reference(model_dir, row["prompt"], row["response"])
        assert row["loss"] == pytest.approx(loss, rel=1e-4)
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)

    run = query(store, "SELECT status, model, parameter_set, config FROM runs").to_pylist()[0]
    assert run["status"] == "completed" and run["model"] == str(model_dir)
    assert json.loads(run["parameter_set"])["parameters"] == sum(
        p.numel() for p in build_llama(LlamaShape(hidden=48, layers=2, heads=4, intermediate=96)).parameters()
    )
    dims = query(store, "SELECT DISTINCT len(feature) AS k FROM features").column("k").to_pylist()
    assert dims == [256]
    n_modules = query(store, "SELECT count(DISTINCT (layer, module)) AS n FROM layer_stats").column("n")[0].as_py()
    assert n_modules == 2 * 7 + 3 + 2 * 2  # linears per layer, embed/final-norm/head, two norms per layer

    again = score_flow(config)  # same inputs and config: the completed run is not redone
    assert again["status"] == "already completed"
    assert query(store, "SELECT count(*) AS n FROM runs").column("n")[0].as_py() == 1


def test_classifier_shard_scoring_matches_autograd(tmp_path):
    """The sequence-classification path (a BERT built from a config, MiniLM's real tokenizer)."""
    import pyarrow as pa
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from gradsift.models.loading import minilm_path
    from gradsift.schemas.config import ModelConfig
    from gradsift.schemas.engine import EngineConfig
    from gradsift.schemas.tables import SAMPLES
    from gradsift.signals.scoring import ShardScorer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts = ["a fine day", "the match ended in a draw after extra time", "stocks fell", "new phone released today"]
    labels = ["sports", "sports", "business", "tech"]
    label_index = {"business": 0, "sports": 1, "tech": 2}
    samples = pa.Table.from_pylist(
        [
            {"dataset": "n", "sample_id": f"s{i}", "text": t, "label": y}
            for i, (t, y) in enumerate(zip(texts, labels, strict=True))
        ],
        schema=SAMPLES,
    )
    scorer = ShardScorer(
        ModelConfig(name_or_path=str(tmp_path), num_labels=3), EngineConfig(feature_dim=512), label_index
    )
    got = {r["sample_id"]: r for r in scorer.score(samples)["scores"].to_pylist()}
    model = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        row = got[f"s{i}"]
        model.zero_grad()
        enc = tokenizer(text, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([label_index[label]])).loss
        loss.backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
        assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_ingest_flow_writes_samples_and_quarantine_only(tmp_path, model_dir, data_file, prefect_harness):
    from gradsift.flows.score import ingest_flow

    config = RunConfig.model_validate(
        {
            "store": str(tmp_path / "store"),
            "model": {"name_or_path": str(model_dir)},
            "ingest": {"sources": [{"path": str(data_file)}]},
        }  # fmt: skip
    )
    result = ingest_flow(config)
    store = Store(config.store)
    counts = query(store, "SELECT (SELECT count(*) FROM samples) AS s, (SELECT count(*) FROM quarantine) AS q, "
                   "(SELECT count(*) FROM scores) AS sc").to_pylist()[0]  # fmt: skip
    assert (result["status"], counts) == ("completed", {"s": 95, "q": 5, "sc": 0})


def test_quarantine_groups_by_category_with_the_specifics_in_detail(tmp_path, model_dir, prefect_harness):
    """``GROUP BY reason`` gives one row per category; line numbers and token counts are in ``detail``."""
    from gradsift.flows.score import ingest_flow

    short = [{"text": f"row {i} is short"} for i in range(4)]
    long = [{"text": f"long row {i} " + "x" * 200} for i in range(3)]
    rows = [short[0], long[0], short[1], short[0], long[1], short[2], long[2], short[1], short[3]]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RunConfig.model_validate(
        {
            "store": str(tmp_path / "store"),
            "model": {"name_or_path": str(model_dir), "max_tokens": 64},
            "ingest": {"sources": [{"path": str(path)}]},
        }
    )
    assert ingest_flow(config)["status"] == "completed"
    store = Store(config.store)
    grouped = query(store, "SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY reason")
    assert [tuple(r.values()) for r in grouped.to_pylist()] == [("duplicate", 2), ("too_long", 3)]
    got = query(store, "SELECT line, reason, detail FROM quarantine ORDER BY line").to_pylist()
    assert [(q["line"], q["reason"]) for q in got] == [
        (2, "too_long"), (4, "duplicate"), (5, "too_long"), (7, "too_long"), (8, "duplicate")
    ]  # fmt: skip
    details = [q["detail"] for q in got]
    assert details[1] == "exact duplicate of line 1" and details[4] == "exact duplicate of line 3"
    for detail in details[0], details[2], details[3]:
        n_tokens = int(detail.split()[0])
        assert n_tokens > 64 and detail == f"{n_tokens} tokens > max_tokens 64"


def test_new_weights_in_the_same_folder_are_a_new_run(tmp_path, model_dir, data_file):
    """A model folder retrained in place changes the run id (no stale 'already completed')."""
    import os
    import shutil

    from gradsift.flows.runs import run_id_for

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    config = RunConfig.model_validate(
        {
            "store": str(tmp_path / "s"),
            "model": {"name_or_path": str(folder)},
            "ingest": {"sources": [{"path": str(data_file)}]},
        }
    )
    before = run_id_for("score", config, config.ingest.sources)
    assert run_id_for("score", config, config.ingest.sources) == before
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert run_id_for("score", config, config.ingest.sources) != before


def test_select_by_grad_norm_of_a_score_run(tmp_path, model_dir, data_file, prefect_harness, ray_local):
    """The score flow's main signal is selectable: drop the highest-gradient half of a score run."""
    from gradsift.flows.select import select_flow
    from gradsift.schemas.train import SelectConfig

    store = str(tmp_path / "store")
    config = RunConfig.model_validate(
        {
            "store": store,
            "model": {"name_or_path": str(model_dir), "max_tokens": 128},
            "ingest": {"sources": [{"path": str(data_file)}], "shard_size": 32},
            "score": {"engine": {"feature_dim": 0, "micro_batch_size": 16}},
            "ray": {"num_actors": 1},
        }
    )
    run = score_flow(config)["run_id"]
    sel = select_flow(SelectConfig(store=store, scores_run=run, score="grad_norm", fractions=[0.5], drop="hard",
                                   stratify="none"))  # fmt: skip
    kept = query(Store(store), "SELECT max(grad_norm) AS top FROM scores JOIN selections USING (sample_id) "
                               "WHERE kept").column("top")[0].as_py()  # fmt: skip
    dropped = query(Store(store), "SELECT min(grad_norm) AS low FROM scores JOIN selections USING (sample_id) "
                                  "WHERE NOT kept").column("low")[0].as_py()  # fmt: skip
    assert sel["status"] == "completed" and kept <= dropped
