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


def test_ingest_and_scoring_reuse_go_by_sample_not_by_shard_name(tmp_path, ray_local):
    """A sample first stored under another shard (the file rewritten with new rows, then renamed) is read back
    from the lake rather than from the file, and scored once: only the new rows of a file are scored."""
    import json

    def file(name: str, rows: list[str]) -> dict:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        return {"path": str(path), "dataset": "web"}

    def run(source: dict) -> dict:
        return score_flow(score_config(store.root, [], ingest={"sources": [source], "shard_size": 8}))

    def n_samples() -> int:
        return query(store, "SELECT count(*) AS n FROM samples").column("n")[0].as_py()

    old = [f"old sample {i}: " + "word " * (2 + i % 5) for i in range(36)]
    new = [f"new sample {i}: " + "word " * (2 + i % 5) for i in range(24)]
    store = Store(tmp_path / "store")
    with use_prefect_server():
        first = run(file("v1.jsonl", old))  # shards of 8, 8, 8, 8, 4
        grown = run(file("v2.jsonl", old + new[:8]))  # the fifth shard now 4 old + 4 new rows: a new shard name
        (tmp_path / "v2.jsonl").rename(tmp_path / "renamed.jsonl")
        renamed = run({"path": str(tmp_path / "renamed.jsonl"), "dataset": "web"})
        halves = run(file("v3.jsonl", [r for pair in zip(old[:8], new[8:16], strict=True) for r in pair]))

    assert first["score"]["rows_scored"] == 36
    assert (grown["ingest"]["samples_reused"], grown["score"]["rows_scored"], grown["score"]["shards_reused"]) == (
        0, 8, 4)  # fmt: skip
    # the renamed file: its ingest is reused although 4 of its samples are stored under v1's fifth shard
    assert (renamed["ingest"]["samples_reused"], renamed["score"]["rows_scored"]) == (44, 0)
    # every shard of v3 is half old, half new: only the new half is scored
    assert (halves["score"]["shards_reused"], halves["score"]["shards_scored"]) == (0, 2)
    assert (halves["score"]["rows_scored"], halves["score"]["rows"]) == (8, 16)
    assert n_samples() == 36 + 8 + 8
    scores = query(store, "SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM scores").to_pylist()
    assert scores == [{"n": 52, "d": 52}]
    # a run's samples are every sample of the shards it ingested, in shard order, wherever first stored
    for result, texts in ((grown, old + new[:8]), (renamed, old + new[:8])):
        got = store.run_table("samples", result["run_id"])
        assert got.column("text").to_pylist() == texts
        assert set(got.column("shard").to_pylist()) == set(result["ingest"]["shards"])


def test_a_shard_recorded_before_shard_members_is_found_by_its_samples_shard(tmp_path):
    """A store whose ingests predate ``shard_members``: a run's samples and ingest reuse are found by the samples'
    own ``shard`` column, and a shard recorded in ``shard_members`` holds its samples wherever they were stored."""
    import json

    import pyarrow as pa

    from gradsift.flows.incremental import reuse_ingest
    from gradsift.schemas.tables import SAMPLES
    from gradsift.storage.lake import INGESTS, SHARD_MEMBERS

    def samples(shard: str, ids: list[str]) -> pa.Table:
        rows = [{"dataset": "d", "sample_id": i, "shard": shard, "text": i, "line": n} for n, i in enumerate(ids)]
        return pa.Table.from_pylist(rows, schema=SAMPLES)

    def ingest(run: str, shards: list[str], n: int) -> pa.Table:
        entry = {"run_id": run, "dataset": "d", "shards": shards, "quarantine_part": "q", "samples": n}
        return pa.Table.from_pylist([{"ingest_key": run, "dataset": "d", "entry": json.dumps(entry)}], schema=INGESTS)

    store = Store(tmp_path / "store").ensure()
    with store.lake() as lake:  # old: no shard_members; new: a shard of two old samples and a new one
        lake.commit_run(
            "old",
            {
                "samples": samples("d-00000-aaaaaaaaaa", ["a", "b", "c"]),
                "ingests": ingest("old", ["d-00000-aaaaaaaaaa"], 3),
            },
        )
        members = pa.Table.from_pylist(
            [
                {"dataset": "d", "shard": "d-00000-bbbbbbbbbb", "sample_id": i, "position": n}
                for n, i in enumerate("cxa")
            ],
            schema=SHARD_MEMBERS,
        )
        new = {"samples": samples("d-00000-bbbbbbbbbb", ["c", "x", "a"]), "shard_members": members}
        lake.commit_run("new", {**new, "ingests": ingest("new", ["d-00000-bbbbbbbbbb"], 3)})
    assert store.run_table("samples", "old").column("sample_id").to_pylist() == ["a", "b", "c"]
    got = store.run_table("samples", "new")
    assert got.column("sample_id").to_pylist() == ["c", "x", "a"]
    assert set(got.column("shard").to_pylist()) == {"d-00000-bbbbbbbbbb"}
    staging = store.staging("again")
    assert reuse_ingest(store, staging, "new")["run_id"] == "new"
    assert staging.read("samples").column("sample_id").to_pylist() == ["c", "x", "a"]
