"""Parquet store and DuckDB catalog: atomic writes, whole-run commit, read-only SQL."""

from __future__ import annotations

import pyarrow as pa
import pytest

from gradsift.schemas.tables import SCORES
from gradsift.storage.catalog import ReadOnlyQueryError, build_catalog, query
from gradsift.storage.store import Store, utc_now


def scores(n, offset=0):
    rows = [{"checkpoint": "final", "dataset": "d", "sample_id": f"s{i + offset}", "loss": float(i)} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=SCORES)


def test_empty_store_has_every_view(tmp_path):
    store = Store(tmp_path).ensure()
    build_catalog(store)
    for table in ["runs", "samples", "quarantine", "scores", "layer_stats", "features", "influence", "mixtures",
                  "selections"]:  # fmt: skip
        assert query(store, f"SELECT count(*) AS n FROM {table}").column("n")[0].as_py() == 0


def test_staged_rows_are_invisible_until_the_run_completes(tmp_path):
    store = Store(tmp_path).ensure()
    staging = store.staging("r1")
    staging.write_part("scores", "shard-0", scores(3))
    store.write_run({"run_id": "r1", "flow": "t", "status": "running", "started_at": utc_now()})
    build_catalog(store)
    assert query(store, "SELECT count(*) AS n FROM scores").column("n")[0].as_py() == 0
    assert staging.has_part("scores", "shard-0") and not list(store.root.rglob("*.tmp"))

    assert staging.commit() == 3
    # moved into tables/ but the run row still says running: still invisible
    build_catalog(store)
    assert query(store, "SELECT count(*) AS n FROM scores").column("n")[0].as_py() == 0
    store.write_run({"run_id": "r1", "flow": "t", "status": "completed", "started_at": utc_now()})
    build_catalog(store)
    got = query(store, "SELECT run_id, count(*) AS n FROM scores GROUP BY run_id").to_pylist()
    assert got == [{"run_id": "r1", "n": 3}]
    assert not staging.dir.exists()


def test_commit_is_idempotent_after_a_crash(tmp_path):
    store = Store(tmp_path).ensure()
    staging = store.staging("r2")
    staging.write_part("scores", "a", scores(2))
    staging.write_part("layer_stats", "a", pa.table({"x": [1]}))
    staging.commit()
    again = store.staging("r2")
    again.write_part("scores", "a", scores(2))  # a rerun rewrites the same part
    again.commit()
    assert [p.name for p in store.committed_parts("scores", "r2")] == ["a.parquet"]


def test_query_is_read_only(tmp_path):
    store = Store(tmp_path).ensure()
    build_catalog(store)
    with pytest.raises(ReadOnlyQueryError, match="read-only"):
        query(store, "CREATE TABLE x AS SELECT 1")
    with pytest.raises(FileNotFoundError, match="run a flow first"):
        query(Store(tmp_path / "nowhere"), "SELECT 1")


# ----- commit: tables, artifacts, internal folders, the committing marker ----------------------------------


def staged_run(store: Store, run_id: str = "r3"):
    staging = store.staging(run_id)
    staging.write_part("scores", "a", scores(2))
    staging.write_part("scores", "b", scores(3, offset=2))
    staging.write_part("layer_stats", "a", pa.table({"x": [1, 2]}))
    staging.write_part("selections", "keep", pa.table({"y": [1]}))
    staging.scratch.write_part("seed_scores", "seed0", pa.table({"z": [1]}))
    staging.artifact_path("manifests", "keep.jsonl").write_text('{"sample_id": "s0"}\n')
    staging.artifact_path("reports", "index.html").write_text("<html></html>")
    staging.mark_done("ingest", {"rows": 5})
    return staging


def test_commit_moves_tables_and_artifacts_and_drops_internal_folders(tmp_path):
    store = Store(tmp_path).ensure()
    staging = staged_run(store)
    assert staging.staged() == (["layer_stats", "scores", "selections"], ["manifests", "reports"])
    assert not (store.root / "manifests").exists() and not (store.root / "reports").exists()
    assert staging.commit() == 8
    assert [p.name for p in store.committed_parts("scores", "r3")] == ["a.parquet", "b.parquet"]
    assert (store.root / "manifests" / "r3" / "keep.jsonl").read_text() == '{"sample_id": "s0"}\n'
    assert (store.root / "reports" / "r3" / "index.html").exists()
    assert not (store.tables / "seed_scores").exists() and not staging.dir.exists()
    assert not list(store.root.rglob("*.tmp")) and not list(store.root.rglob(".*.old"))


def test_commit_refuses_what_it_does_not_know(tmp_path):
    store = Store(tmp_path).ensure()
    staging = staged_run(store)
    (staging.dir / "_old_internal").mkdir()
    with pytest.raises(ValueError, match="_old_internal"):
        staging.commit()
    (staging.dir / "_old_internal").rmdir()
    (staging.dir / "_artifacts" / "tables").mkdir()  # an artifact kind would land in <store>/tables/<run_id>
    with pytest.raises(ValueError, match="not an artifact kind"):
        staging.commit()
    with pytest.raises(ValueError, match="table names"):
        staging.write_part("_stages", "x", pa.table({"x": [1]}))
    with pytest.raises(ValueError, match="artifact kind"):
        staging.artifact_path("tables", "x")
    assert not (store.tables / "scores").exists()  # nothing moved


def test_interrupted_commit_is_finished_by_the_next_commit(tmp_path):
    store = Store(tmp_path).ensure()
    staging = staged_run(store)
    plan = staging.prepare_commit({"selections": ["keep"]})  # the committing marker: what will move
    assert plan["tables"] == {"layer_stats": 2, "scores": 5, "selections": 1}
    assert staging.pending_commit() == plan
    staging.commit_table("layer_stats")  # ... and the process dies here
    staging.commit_table("scores")

    again = store.staging("r3")  # the next run of the same id
    assert again.pending_commit()["result"] == {"selections": ["keep"]}
    assert again.commit() == 8  # the moved tables' rows come from the marker
    for table, parts in {"layer_stats": ["a"], "scores": ["a", "b"], "selections": ["keep"]}.items():
        assert [p.stem for p in store.committed_parts(table, "r3")] == parts
        assert list(store.tables.glob(f"{table}/run_id=*")) == [store.tables / table / "run_id=r3"]
    assert (store.root / "manifests" / "r3" / "keep.jsonl").exists() and not again.dir.exists()
    assert again.pending_commit() is None


def test_commit_killed_midway_is_rolled_forward(tmp_path):
    """A real SIGKILL between two table moves of a commit, then the next commit finishes it."""
    import signal
    import subprocess
    import sys

    store = Store(tmp_path / "store").ensure()
    staged_run(store)
    script = (
        "import os, signal, sys\n"
        "from gradsift.storage.store import Store\n"
        "staging = Store(sys.argv[1]).staging('r3')\n"
        "plan = staging.prepare_commit()\n"
        "staging.commit_table(sorted(plan['tables'])[0])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(store.root)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (store.tables / "layer_stats" / "run_id=r3").exists() and not (store.tables / "scores").exists()
    assert store.staging("r3").commit() == 8
    assert [p.stem for p in store.committed_parts("scores", "r3")] == ["a", "b"]
    assert (store.root / "reports" / "r3" / "index.html").exists() and not store.staging("r3").dir.exists()


def test_query_binds_parameters(tmp_path):
    store = Store(tmp_path).ensure()
    staging = store.staging("r1")
    staging.write_part("scores", "a", scores(3))
    staging.commit()
    store.write_run({"run_id": "r1", "flow": "t", "status": "completed", "started_at": utc_now()})
    build_catalog(store)
    sql = "SELECT count(*) AS n FROM scores WHERE run_id = $run"
    assert query(store, sql, {"run": "r1"}).column("n")[0].as_py() == 3
    assert query(store, sql, {"run": "r1' OR '1'='1"}).column("n")[0].as_py() == 0
    listed = "SELECT count(*) AS n FROM scores WHERE list_contains($runs, run_id)"
    assert query(store, listed, {"runs": ["r1", "r2"]}).column("n")[0].as_py() == 3
    assert query(store, "SELECT count(*) AS n FROM scores WHERE run_id = ?", ["r1"]).column("n")[0].as_py() == 3
    with pytest.raises(ReadOnlyQueryError, match="read-only"):  # the statement is checked whatever the values
        query(store, "CREATE TABLE x AS SELECT $a AS a", {"a": 1})


# ----- atomic writes and typed keys ------------------------------------------------------------------------


def test_write_atomic_leaves_no_temp_file_on_any_failure(tmp_path):
    from gradsift.storage.atomic import replace_dir, write_atomic, write_dir_atomic

    def broken(tmp):
        tmp.write_text("half")
        (tmp.parent / f"{tmp.name}.wal").write_text("sidecar")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_atomic(tmp_path / "f.json", broken)
    with pytest.raises(RuntimeError, match="boom"):
        write_dir_atomic(tmp_path / "d", lambda tmp: broken(tmp / "x"))
    assert list(tmp_path.iterdir()) == []
    assert write_atomic(tmp_path / "f.json", "{}").read_text() == "{}"
    write_dir_atomic(tmp_path / "d", lambda tmp: (tmp / "x").write_text("1"))
    write_dir_atomic(tmp_path / "d", lambda tmp: (tmp / "y").write_text("2"))  # replaces the whole folder
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["y"]
    (tmp_path / "src").mkdir()
    replace_dir(tmp_path / "src", tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]


def test_typed_keys_round_trip():
    from gradsift.storage.keys import CheckpointFeature, FeaturePart, ShardKey

    key = ShardKey.of("my-data-set", 3, ["a", "b"])
    assert key.name.startswith("my-data-set-00003-") and ShardKey.parse(key.name) == key
    with pytest.raises(ValueError, match="not a shard name"):
        ShardKey.parse("no-digest")
    assert FeaturePart("d-00000-0123456789").name == "d-00000-0123456789"
    part = FeaturePart("d-00000-0123456789", "train-x-seed0.step-000012")
    assert part.name == "d-00000-0123456789@train-x-seed0.step-000012" and FeaturePart.parse(part.name) == part
    feat = CheckpointFeature("train-x-seed0.step-000012", "adam")
    assert feat.value == "train-x-seed0.step-000012:adam" and CheckpointFeature.parse(feat.value) == feat
    with pytest.raises(ValueError, match="feature kind"):
        CheckpointFeature("c", "hessian")


def test_a_column_added_to_a_schema_reads_as_null_from_older_parts(tmp_path):
    """A quarantine part written before ``detail`` existed still reads: alone, and next to a newer part."""
    from gradsift.schemas.tables import QUARANTINE

    store = Store(tmp_path).ensure()
    old = pa.table({"dataset": ["d"], "source": ["d.jsonl"], "line": [3], "reason": ["over-long: 9 > 8"], "raw": [""]})
    for run_id, part in (("old", old), ("new", None)):
        if part is None:
            row = {"dataset": "d", "source": "d.jsonl", "line": 4, "reason": "too_long", "detail": "9 > 8", "raw": ""}
            part = pa.Table.from_pylist([row], schema=QUARANTINE)
        staging = store.staging(run_id)
        staging.write_part("quarantine", "d", part)
        staging.commit()
        store.write_run({"run_id": run_id, "flow": "t", "status": "completed", "started_at": utc_now()})
        build_catalog(store)
        got = query(store, "SELECT run_id, line, reason, detail FROM quarantine ORDER BY line").to_pylist()
        assert got[0] == {"run_id": "old", "line": 3, "reason": "over-long: 9 > 8", "detail": None}
    assert got[1] == {"run_id": "new", "line": 4, "reason": "too_long", "detail": "9 > 8"}
    assert query(store, "SELECT * FROM quarantine").column_names == [*QUARANTINE.names, "run_id"]
