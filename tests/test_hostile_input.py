"""Hostile input through the real CLI: every good row scored, every bad row quarantined with its category,
rc 0 and no traceback; configs with typos or wrong shapes refused with gradsift's message."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hostile_corpus import check_quarantine, write_corpus
from live_services import GRADSIFT, SCORE_ARGS, gradsift_env

from gradsift.storage.catalog import query
from gradsift.storage.store import Store


def _run(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([GRADSIFT, *args], env={**env, "COLUMNS": "200"}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    return proc


def _assert_clean(proc: subprocess.CompletedProcess, rc: int = 0) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    return out


def _tables(store: Path) -> tuple[list[dict], list[dict]]:
    st = Store(store)
    samples = query(st, "SELECT source, line, sample_id FROM samples").to_pylist()
    quarantine = query(st, "SELECT source, line, reason, detail FROM quarantine").to_pylist()
    return samples, quarantine


def _scored_all(store: Path) -> None:
    counts = query(Store(store), "SELECT (SELECT count(*) FROM samples) AS n, (SELECT count(*) FROM scores) AS s")
    row = counts.to_pylist()[0]
    assert row["n"] == row["s"] > 0, row


def test_score_cli_on_the_hostile_corpus(tmp_path, ray_local):
    corpus = write_corpus(tmp_path / "data")
    store = tmp_path / "store"
    proc = _run(
        ["score", *map(str, corpus.files), "--store", str(store), *SCORE_ARGS], gradsift_env(tmp_path, ray_local)
    )
    out = _assert_clean(proc)
    samples, quarantine = _tables(store)
    check_quarantine(corpus, samples, quarantine)
    _scored_all(store)
    assert "UTF-16 LE byte-order mark found" in out and "skipping" in out
    ingested = tmp_path / "ingest-only"
    _assert_clean(
        _run(["ingest", *map(str, corpus.files), "--store", str(ingested)], gradsift_env(tmp_path, ray_local))
    )
    check_quarantine(corpus, *_tables(ingested))


def test_classifier_labels_fixed_at_ingest(tmp_path, tiny_bert, ray_local):
    """Unknown or missing labels are quarantined at ingest; scoring a 2-class head never sees them."""
    corpus = write_corpus(tmp_path / "data", labelled=True)
    store = tmp_path / "store"
    args = ["score", *map(str, corpus.files), "--store", str(store), "--model", tiny_bert, "--num-labels", "2"]
    small = ["--shard-size", "8", "--feature-dim", "0", "--num-actors", "1"]
    _assert_clean(_run([*args, *small], gradsift_env(tmp_path, ray_local)))
    samples, quarantine = _tables(store)
    check_quarantine(corpus, samples, quarantine)
    _scored_all(store)


def test_train_cli_quarantines_unlabelled_rows(tmp_path, tiny_bert, ray_local):
    """A proxy takes its classes from the data: a row with no label is quarantined, a new class is a class."""
    corpus = write_corpus(tmp_path / "data", labelled=True)
    store = tmp_path / "store"
    [jsonl] = [f for f in corpus.files if f.name == "hostile.jsonl"]
    args = ["train", str(jsonl), "--store", str(store), "--model", tiny_bert, "--mode", "finetune", "--epochs", "1",
            "--score-epoch", "1", "--seeds", "0", "--batch-size", "4"]  # fmt: skip
    _assert_clean(_run(args, gradsift_env(tmp_path, ray_local)))
    samples, quarantine = _tables(store)
    got = sorted((q["line"], q["reason"]) for q in quarantine)
    want = [(line, cat) for line, cat in corpus.bad["hostile.jsonl"] if cat != "unknown_label"]
    assert got == want
    assert len(samples) == corpus.good["hostile.jsonl"] + 1


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[ingest]\nsources = [{path = "d.jsonl"}]\n[score.engine]\nfeture_dim = 8\n', "score.engine.feture_dim"),
        ("ingest = 5\n", "ingest"),
        ('[ingest]\nsources = [{dataset = "x"}]\n', "ingest.sources.0.path"),
        ('store = 5\n[ingest]\nsources = [{path = "d.jsonl"}]\n', "store"),
        ('[ingest]\nsources = [{path = "missing.jsonl"}]\n', "input files not found"),
        ("[ingest\n", "curate.toml"),
    ],
)
def test_config_errors_name_the_field(tmp_path, toml, message):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "curate.toml").write_text(toml)
    proc = subprocess.run([GRADSIFT, "nightly", "--config", str(tmp_path / "curate.toml")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200", "GRADSIFT_STATE": str(tmp_path / "state")})  # fmt: skip
    out = _assert_clean(proc, rc=2)
    assert "error:" in out and message in out, out
