"""Incremental nightly: new data costs only its own compute and adds only its own rows; a changed score config
rescores exactly what it changes."""

from __future__ import annotations

from live_services import score_config, use_prefect_server, write_rows

from gradsift.flows.score import score_flow
from gradsift.storage.catalog import query
from gradsift.storage.store import Store


def test_new_file_scores_only_new_rows_and_config_change_rescores(tmp_path, ray_local):
    old = write_rows(tmp_path / "old.jsonl", 40, "old")
    store = Store(tmp_path / "store")
    with use_prefect_server():
        first = score_flow(score_config(store.root, [old]))
        new = write_rows(tmp_path / "new.jsonl", 24, "new")
        second = score_flow(score_config(store.root, [old, new]))
        again = score_flow(score_config(store.root, [old, new]))
        rescored = score_flow(score_config(store.root, [old, new], score={"engine": {"feature_dim": 128}}))

    assert first["score"]["rows_scored"] == 40
    assert (second["ingest"]["samples"], second["ingest"]["samples_reused"]) == (64, 40)
    assert (second["score"]["rows_scored"], second["score"]["shards_reused"]) == (24, 5)
    assert again["status"] == "already completed"
    # the score config is part of the scoring key: every score is recomputed, ingest is still reused
    assert (rescored["ingest"]["samples_reused"], rescored["score"]["rows_scored"]) == (64, 64)

    # stored once per key: each run wrote only what no earlier run had under its scoring key
    per_run = query(
        store,
        "SELECT run_id, dataset, count(*) AS n FROM scores JOIN samples USING (dataset, sample_id) "
        "GROUP BY ALL ORDER BY ALL",
    ).to_pylist()
    expected = {
        (first["run_id"], "old", 40),
        (second["run_id"], "new", 24),
        (rescored["run_id"], "old", 40),
        (rescored["run_id"], "new", 24),
    }
    assert {(r["run_id"], r["dataset"], r["n"]) for r in per_run} == expected
    keys = query(
        store, "SELECT score_key, count(*) AS n, count(DISTINCT sample_id) AS ids FROM scores GROUP BY ALL"
    ).to_pylist()
    assert sorted((r["n"], r["ids"]) for r in keys) == [(64, 64), (64, 64)]  # two keys, each sample once
    runs = query(store, "SELECT run_id, score_key, snapshot_id FROM runs ORDER BY snapshot_id").to_pylist()
    assert [r["run_id"] for r in runs] == [first["run_id"], second["run_id"], rescored["run_id"]]
    assert runs[0]["score_key"] == runs[1]["score_key"] != runs[2]["score_key"]

    # a new run (only its report settings differ) whose every shard is reused still records its parameter set
    with use_prefect_server():
        all_reused = score_flow(score_config(store.root, [old, new], report={"top_n": 3}))
    assert (all_reused["score"]["rows_scored"], all_reused["score"]["shards_scored"]) == (0, 0)
    assert all_reused["score"]["parameter_set"] == rescored["score"]["parameter_set"] is not None
