"""The store: staged parts committed into the DuckLake in one transaction with their runs row, read-only SQL."""

from __future__ import annotations

import pyarrow as pa
import pytest

from gradsift.schemas.tables import SCORES
from gradsift.storage.catalog import ReadOnlyQueryError, query
from gradsift.storage.store import OldLayoutError, Store


def scores(n, offset=0):
    rows = [{"checkpoint": "final", "dataset": "d", "sample_id": f"s{i + offset}", "loss": float(i)} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=SCORES)


def count(store: Store, table: str) -> int:
    return query(store, f"SELECT count(*) AS n FROM {table}").column("n")[0].as_py()


def run_row(run_id: str) -> dict:
    return {"run_id": run_id, "flow": "t", "status": "completed"}


def test_empty_store_has_every_view(tmp_path):
    store = Store(tmp_path).ensure()
    for table in ["runs", "samples", "quarantine", "scores", "layer_stats", "features", "influence", "mixtures",
                  "selections", "influence_history", "selections_history"]:  # fmt: skip
        assert count(store, table) == 0


def test_staged_rows_are_invisible_until_the_run_commits(tmp_path):
    store = Store(tmp_path).ensure()
    staging = store.staging("r1")
    staging.write_part("scores", "shard-0", scores(3))
    assert count(store, "scores") == 0 and count(store, "runs") == 0
    assert staging.has_part("scores", "shard-0") and not list(store.root.rglob("*.tmp"))
    assert staging.commit(run_row("r1")) == 3
    got = query(store, "SELECT run_id, score_key, count(*) AS n FROM scores GROUP BY ALL").to_pylist()
    assert got == [{"run_id": "r1", "score_key": "r1", "n": 3}]  # no scoring key staged: the run's own id
    runs = query(store, "SELECT run_id, status, rows_written, snapshot_id FROM runs").to_pylist()
    assert runs == [{"run_id": "r1", "status": "completed", "rows_written": 3, "snapshot_id": runs[0]["snapshot_id"]}]
    staging.finish()
    assert not staging.dir.exists()


def test_rows_are_stored_once_per_key(tmp_path):
    """The same scores staged again under the same scoring key (a rerun, a nightly over unchanged data) add a
    snapshot and a runs row, no rows; another key adds its own."""
    store = Store(tmp_path).ensure()
    for run_id, key, n in (("r1", "k", 3), ("r2", "k", 0), ("r3", "other", 3)):
        staging = store.staging(run_id)
        staging.write_part("scores", "a", scores(3))
        staging.set_score_key(key)
        assert staging.commit(run_row(run_id)) == n
        staging.finish()
    assert count(store, "scores") == 6 and count(store, "runs") == 3
    got = query(store, "SELECT score_key, count(*) AS n FROM scores GROUP BY ALL ORDER BY 1").to_pylist()
    assert got == [{"score_key": "k", "n": 3}, {"score_key": "other", "n": 3}]


def test_query_is_read_only(tmp_path):
    store = Store(tmp_path).ensure()
    with pytest.raises(ReadOnlyQueryError, match="read-only"):
        query(store, "CREATE TABLE x AS SELECT 1")
    with pytest.raises(FileNotFoundError, match="run a flow first"):
        query(Store(tmp_path / "nowhere"), "SELECT 1")


def test_old_layout_store_gets_the_message(tmp_path):
    """A store of the hard-linked Parquet layout (``tables/<table>/run_id=<id>/``, no lake) is refused with how to
    move on, by readers and writers alike; nothing is written into it."""
    (tmp_path / "tables" / "scores" / "run_id=old").mkdir(parents=True)
    for call in (lambda: query(Store(tmp_path), "SELECT 1"), lambda: Store(tmp_path).ensure()):
        with pytest.raises(OldLayoutError, match="earlier gradsift.*new --store"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables"]


# ----- commit: tables, artifacts, internal folders ---------------------------------------------------------


def staged_run(store: Store, run_id: str = "r3"):
    staging = store.staging(run_id)
    staging.write_part("scores", "a", scores(2))
    staging.write_part("scores", "b", scores(3, offset=2))
    staging.write_part("mixtures", "weights", pa.table({"domain": ["x", "y"], "weight": [0.5, 0.5]}))
    staging.write_part("selections", "keep", pa.table({"selection": ["keep"], "sample_id": ["s0"]}))
    staging.scratch.write_part("seed_scores", "seed0", pa.table({"z": [1]}))
    staging.artifact_path("manifests", "keep.jsonl").write_text('{"sample_id": "s0"}\n')
    staging.artifact_path("reports", "index.html").write_text("<html></html>")
    staging.mark_done("ingest", {"rows": 5})
    return staging


def test_commit_writes_tables_then_moves_artifacts_and_drops_internal_folders(tmp_path):
    store = Store(tmp_path).ensure()
    staging = staged_run(store)
    assert staging.staged() == (["mixtures", "scores", "selections"], ["manifests", "reports"])
    assert not (store.root / "manifests").exists() and not (store.root / "reports").exists()
    assert staging.commit(run_row("r3")) == 8
    assert [count(store, t) for t in ("scores", "mixtures", "selections")] == [5, 2, 1]
    staging.finish()
    assert (store.root / "manifests" / "r3" / "keep.jsonl").read_text() == '{"sample_id": "s0"}\n'
    assert (store.root / "reports" / "r3" / "index.html").exists()
    assert not staging.dir.exists() and "seed_scores" not in query(store, "SHOW TABLES")["name"].to_pylist()
    assert not list(store.root.rglob("*.tmp")) and not list(store.root.rglob(".*.old"))


def test_commit_refuses_what_it_does_not_know(tmp_path):
    store = Store(tmp_path).ensure()
    staging = staged_run(store)
    (staging.dir / "_old_internal").mkdir()
    with pytest.raises(ValueError, match="_old_internal"):
        staging.commit(run_row("r3"))
    (staging.dir / "_old_internal").rmdir()
    (staging.dir / "_artifacts" / "tables").mkdir()
    with pytest.raises(ValueError, match="not an artifact kind"):
        staging.commit(run_row("r3"))
    (staging.dir / "_artifacts" / "tables").rmdir()
    staging.write_part("mixtures", "extra", pa.table({"domain": ["z"], "nonsense": [1]}))
    with pytest.raises(ValueError, match="mixtures: columns not in its schema: \\['nonsense'\\]"):
        staging.commit(run_row("r3"))
    with pytest.raises(ValueError, match="table names"):
        staging.write_part("_stages", "x", pa.table({"x": [1]}))
    with pytest.raises(ValueError, match="artifact kind"):
        staging.artifact_path("tables", "x")
    assert count(store, "scores") == 0 and count(store, "runs") == 0  # nothing committed, not even in part


def run_killed(script: str, store: Store) -> None:
    """Run ``script`` (argv[1]: the store) in a fresh Python; it must end by SIGKILL."""
    import signal
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script, str(store.root)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_commit_killed_midway_leaves_the_previous_snapshot(tmp_path):
    """A real SIGKILL inside the commit's transaction, after some tables were written (their data files are on
    disk): readers see the previous snapshot, and the next commit of the run writes it whole."""

    store = Store(tmp_path / "store").ensure()
    first = store.staging("r0")
    first.write_part("scores", "z", scores(1, offset=100))
    first.commit(run_row("r0"))
    first.finish()
    staged_run(store)
    script = (
        "import os, signal, sys\n"
        "from gradsift.storage import lake\n"
        "from gradsift.storage.store import Store\n"
        "insert, done = lake.Lake._insert, []\n"
        "def dying(self, *args):\n"
        "    done.append(insert(self, *args))\n"
        "    if len(done) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return done[-1]\n"
        "lake.Lake._insert = dying\n"
        "Store(sys.argv[1]).staging('r3').commit({'run_id': 'r3', 'status': 'completed'})\n"
    )
    run_killed(script, store)
    assert list((store.root / "lake_data").rglob("*.parquet"))  # written, never committed
    assert [count(store, t) for t in ("scores", "mixtures", "runs")] == [1, 0, 1]
    assert store.read_run("r3") is None
    assert store.staging("r3").commit(run_row("r3")) == 8
    assert [count(store, t) for t in ("scores", "mixtures", "runs")] == [6, 2, 2]


def test_query_binds_parameters(tmp_path):
    store = Store(tmp_path).ensure()
    staging = store.staging("r1")
    staging.write_part("scores", "a", scores(3))
    staging.commit(run_row("r1"))
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


def test_a_column_missing_from_a_part_reads_as_null(tmp_path):
    """A quarantine part written before ``detail`` existed commits with ``detail`` null, next to a newer part."""
    from gradsift.schemas.tables import QUARANTINE

    store = Store(tmp_path).ensure()
    old = pa.table({"dataset": ["d"], "source": ["d.jsonl"], "line": [3], "reason": ["over-long: 9 > 8"], "raw": [""]})
    row = {"dataset": "d", "source": "d.jsonl", "line": 4, "reason": "too_long", "detail": "9 > 8", "raw": ""}
    staging = store.staging("r1")
    staging.write_part("quarantine", "old", old)
    staging.write_part("quarantine", "new", pa.Table.from_pylist([row], schema=QUARANTINE))
    staging.commit(run_row("r1"))
    got = query(store, "SELECT run_id, line, reason, detail FROM quarantine ORDER BY line").to_pylist()
    assert got == [
        {"run_id": "r1", "line": 3, "reason": "over-long: 9 > 8", "detail": None},
        {"run_id": "r1", "line": 4, "reason": "too_long", "detail": "9 > 8"},
    ]
    assert query(store, "SELECT * FROM quarantine").column_names == ["run_id", *QUARANTINE.names]


VIEWS = {
    "scores": "SELECT * FROM scores ORDER BY sample_id",
    "mixtures": "SELECT * FROM mixtures",
    "runs": "SELECT * EXCLUDE (snapshot_id) FROM runs ORDER BY run_id",
}


def view_bytes(store: Store) -> dict[str, bytes]:
    """The bytes of each ``VIEWS`` result's rows, not of how they were read: the rows are rebuilt from their values,
    so neither the chunking nor an all-valid null bitmap that a scan may attach changes them."""
    import pyarrow.ipc as ipc

    out = {}
    for name, text in VIEWS.items():
        table, sink = query(store, text), pa.BufferOutputStream()
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(pa.Table.from_pylist(table.to_pylist(), schema=table.schema))
        out[name] = sink.getvalue().to_pybytes()
    return out


def nightly_commit(store: Store, night: int) -> list[str]:
    """A night's commit: the earlier scores again and 4 new (one new data file), new mixture weights; the tables
    whose files the commit merged."""
    staging = store.staging(f"n{night}")
    staging.write_part("scores", "a", scores(4 * (night + 1)))
    staging.write_part("mixtures", "weights", pa.table({"domain": ["x"], "weight": [night / 10]}))
    staging.set_score_key("k")
    staging.commit(run_row(f"n{night}"))
    staging.finish()
    return staging.merged


def test_the_commit_merges_a_tables_files_past_the_threshold_keeping_every_result(tmp_path):
    """The merge ``RunStaging.commit`` runs keeps every view's bytes and time travel to the first night; with
    ``merge_over_files`` 3 the fourth night's commit merges scores, mixtures_history and runs (4 files each)."""
    from gradsift.storage.check import check_store, lake_files
    from gradsift.storage.store import LakeConfig

    (tmp_path / "a" / Store.CONFIG).parent.mkdir()
    (tmp_path / "a" / Store.CONFIG).write_text(LakeConfig(merge_over_files=10**6).model_dump_json())
    store = Store(tmp_path / "a").ensure()
    assert [nightly_commit(store, night) for night in range(4)] == [[], [], [], []]
    before, files = view_bytes(store), len(lake_files(store))
    first = query(store, "SELECT min(snapshot_id) AS s FROM runs").column("s")[0].as_py()
    with store.lake() as lake:
        assert lake.merge_when_over(3) == ["mixtures_history", "runs", "scores"]
    assert view_bytes(store) == before and len(lake_files(store)) < files and check_store(store) == []
    assert query(store, f"SELECT count(*) AS n FROM lake.scores AT (VERSION => {first})").column("n")[0].as_py() == 4
    (tmp_path / "b" / Store.CONFIG).parent.mkdir()
    (tmp_path / "b" / Store.CONFIG).write_text(LakeConfig(merge_over_files=3).model_dump_json())
    merging = Store(tmp_path / "b").ensure()
    merged = [nightly_commit(merging, night) for night in range(5)]
    assert merged == [[], [], [], ["mixtures_history", "runs", "scores"], []]  # night 4: two files each again
    assert count(merging, "scores") == 20 and count(merging, "runs") == 5 and check_store(merging) == []


def test_a_kill_during_the_merge_leaves_a_readable_store(tmp_path):
    """SIGKILL after the first table's merge committed and before the next (and before the old files are
    removed): every view reads the same bytes, ``store check`` finds every file, and the next commit merges the
    rest."""

    from gradsift.storage.check import check_store
    from gradsift.storage.store import LakeConfig

    (tmp_path / Store.CONFIG).write_text(LakeConfig(merge_over_files=10**6).model_dump_json())
    store = Store(tmp_path).ensure()
    for night in range(4):
        nightly_commit(store, night)
    before = view_bytes(store)
    script = (
        "import os, signal, sys\n"
        "from gradsift.storage import lake\n"
        "class Dying:\n"
        "    merges = 0\n"
        "    def __init__(self, con): self.con = con\n"
        "    def __getattr__(self, name): return getattr(self.con, name)\n"
        "    def execute(self, sql, *args):\n"
        "        if 'merge_adjacent_files' in sql:\n"
        "            Dying.merges += 1\n"
        "            if Dying.merges == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return self.con.execute(sql, *args)\n"
        "with lake.Lake(sys.argv[1], 'sqlite', inline_rows=0) as lk:\n"
        "    lk.con = Dying(lk.con)\n"
        "    lk.merge_when_over(3)\n"
    )
    run_killed(script, store)
    assert view_bytes(store) == before and check_store(store) == []
    (tmp_path / Store.CONFIG).write_text(LakeConfig(merge_over_files=3).model_dump_json())
    assert nightly_commit(Store(tmp_path), 4) == ["runs", "scores"]
    assert check_store(store) == []


def test_compact_and_expire_keep_the_current_state_byte_identical(tmp_path):
    """Five nightly commits (one file per table per night), then `store compact` and `store expire`: every view's
    result is the same bytes; expire drops the old snapshots (time travel to them stops), compact merges files."""
    from typer.testing import CliRunner

    from gradsift.cli.commands import app
    from gradsift.storage.check import check_store, lake_files

    store = Store(tmp_path).ensure()
    for night in range(5):
        nightly_commit(store, night)

    def state() -> dict[str, bytes]:
        return view_bytes(store)

    before, files = state(), len(lake_files(store))
    runner = CliRunner()
    assert runner.invoke(app, ["store", "compact", "--store", str(store.root)]).exit_code == 0
    assert state() == before and len(lake_files(store)) < files
    first = query(store, "SELECT min(snapshot_id) AS s FROM runs").column("s")[0].as_py()
    assert query(store, f"SELECT count(*) AS n FROM lake.scores AT (VERSION => {first})").column("n")[0].as_py() == 4
    out = runner.invoke(app, ["store", "expire", "--older-than", "0h", "--store", str(store.root)])
    assert out.exit_code == 0, out.output
    assert state() == before and check_store(store) == []
    with pytest.raises(Exception, match="No snapshot found"):
        query(store, f"SELECT count(*) FROM lake.scores AT (VERSION => {first})")
    assert runner.invoke(app, ["store", "expire", "--older-than", "30 days", "--store", str(store.root)]).exit_code == 2
