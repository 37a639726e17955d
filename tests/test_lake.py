"""The DuckLake prototype (gradsift.storage.lake): stored once per key, snapshots, atomic commits, read-only queries.

Skipped under duckdb 2.0 (no ducklake extension wheel); run with duckdb 1.5.5 and duckdb-extension-ducklake 1.5.5,
e.g. ``pip install --target .duck duckdb==1.5.5 duckdb-extension-ducklake==1.5.5`` and ``PYTHONPATH=.duck:.``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from gradsift.storage import lake as lakemod

try:
    lakemod.ducklake_extension()
except lakemod.LakeUnavailable as err:  # pragma: no cover - depends on the installed duckdb
    pytest.skip(f"DuckLake prototype needs the ducklake extension: {err}", allow_module_level=True)

from lake_reader import lake_reader as connect_readonly  # noqa: E402
from lake_reader import query_readonly  # noqa: E402

from gradsift.storage.catalog import ReadOnlyQueryError  # noqa: E402
from gradsift.storage.lake import Lake  # noqa: E402
from gradsift.storage.lake_query import current_view_sql  # noqa: E402


def samples(n: int, start: int = 0) -> pa.Table:
    ids = [f"s{i:06d}" for i in range(start, start + n)]
    return pa.table(
        {"dataset": ["d"] * n, "sample_id": ids, "domain": [f"dom{i % 3}" for i in range(start, start + n)]}
    )


def scores(n: int, start: int = 0) -> pa.Table:
    ids = [f"s{i:06d}" for i in range(start, start + n)]
    return pa.table(
        {
            "checkpoint": ["final"] * n,
            "dataset": ["d"] * n,
            "sample_id": ids,
            "loss": pa.array([float(i) for i in range(n)], pa.float32()),
        }
    )


def features(n: int, dim: int = 4) -> pa.Table:
    return pa.table(
        {
            "checkpoint": ["final"] * n,
            "dataset": ["d"] * n,
            "sample_id": [f"s{i:06d}" for i in range(n)],
            "feature": pa.array([[float(i)] * dim for i in range(n)], pa.list_(pa.float16(), dim)),
        }
    )


def night(n: int) -> dict[str, pa.Table]:
    return {
        "samples": samples(n),
        "scores": scores(n),
        "features": features(n),
        "mixtures": pa.table({"domain": ["dom0", "dom1"], "weight": [0.4, 0.6]}),
    }


def count(con, sql: str) -> int:
    return con.execute(sql).fetchone()[0]


@pytest.fixture
def lake(tmp_path):
    with Lake(tmp_path / "store") as lk:
        yield lk


def test_unchanged_nights_add_snapshots_not_rows(lake, tmp_path):
    for night_no in range(30):
        written = lake.commit_run(f"r{night_no:03d}", night(200), run={"status": "completed"}, score_key="k1")
        if night_no:
            assert written == {"samples": 0, "scores": 0, "features": 0, "mixtures": 2}
    con = lake.con
    assert count(con, "SELECT count(*) FROM lake.scores") == 200
    assert count(con, "SELECT count(DISTINCT (score_key, checkpoint, dataset, sample_id)) FROM lake.scores") == 200
    assert count(con, "SELECT count(*) FROM lake.samples") == 200
    assert count(con, "SELECT count(*) FROM lake.runs") == 30
    assert count(con, f"SELECT count(*) FROM ({current_view_sql('mixtures')})") == 2  # latest run only
    assert count(con, "SELECT count(*) FROM lake.mixtures_history") == 60
    # a new scoring key (another checkpoint/model/config) is new rows; the same key again is not
    assert lake.commit_run("r100", {"scores": scores(200)}, score_key="k2") == {"scores": 200}
    assert lake.commit_run("r101", {"scores": scores(200)}, score_key="k2") == {"scores": 0}
    # each run's snapshot is recorded, and the runs view shows it
    runs = dict(con.execute(f"SELECT run_id, snapshot_id FROM ({current_view_sql('runs')})").fetchall())
    assert runs == {run_id: sid for sid, run_id in lake.snapshots() if run_id}
    assert len(set(runs.values())) == 32


def test_a_commit_of_many_parts_inserts_in_batches_keeping_each_key_once(tmp_path, monkeypatch):
    """Staged parts go in up to INSERT_BYTES at a time (bounded memory), one data file each; a key repeated across
    batches, and one already stored, is kept once."""
    import pyarrow.parquet as pq

    lake = Lake(tmp_path / "store", inline_rows=0).open()  # every INSERT a data file, as in a store
    lake.commit_run("r0", {"samples": samples(5)})
    parts = []
    for i in range(7):  # parts of 10 rows overlapping their neighbours by 5, starting inside the stored rows
        pq.write_table(samples(10, start=5 * i), path := tmp_path / f"part-{i}.parquet")
        parts.append(path)
    monkeypatch.setattr(lakemod, "INSERT_BYTES", 2 * lakemod._uncompressed_bytes(parts[0]))
    assert [len(b) for b in lakemod._batches(parts)] == [2, 2, 2, 1]
    assert lake.commit_run("r1", {"samples": parts}) == {"samples": 35}  # rows s000005..s000039 are new
    files = "SELECT file_count FROM ducklake_table_info('lake') WHERE table_name = 'samples'"
    assert count(lake.con, files) == 1 + 4
    assert count(lake.con, "SELECT count(*) FROM lake.samples") == 40
    assert count(lake.con, "SELECT count(DISTINCT sample_id) FROM lake.samples") == 40
    lake.close()


def test_current_view_of_per_run_tables_is_the_latest_commit(lake):
    """Run ids are content hashes: the latest run is the one committed last, whatever its id sorts like."""
    mix = {"zzz-first": [0.9, 0.1], "aaa-second": [0.2, 0.8]}
    for run_id, weights in mix.items():
        lake.commit_run(run_id, {"mixtures": pa.table({"domain": ["a", "b"], "weight": weights})})
    lake.commit_run("mmm-third", {"selections": pa.table({"selection": ["top"], "sample_id": ["s1"]})})
    rows = lake.con.execute(f"SELECT run_id, weight FROM ({current_view_sql('mixtures')}) ORDER BY domain").fetchall()
    assert rows == [("aaa-second", 0.2), ("aaa-second", 0.8)]
    first = lake.snapshots()[-3][0]
    at_first = f"SELECT DISTINCT run_id FROM ({current_view_sql('mixtures', version=first)})"
    assert lake.con.execute(at_first).fetchall() == [("zzz-first",)]


def test_time_travel_sees_each_snapshot(lake):
    made = {}
    for night_no in range(5):  # 100 samples, 10 new each night
        lake.commit_run(f"r{night_no:03d}", {"scores": scores(100 + 10 * night_no)}, score_key="k")
        made[night_no] = lake.snapshots()[-1][0]
    for night_no, sid in made.items():
        assert count(lake.con, f"SELECT count(*) FROM lake.scores AT (VERSION => {sid})") == 100 + 10 * night_no
        at = f"SELECT count(*) FROM ({current_view_sql('runs', version=sid)})"
        assert count(lake.con, at) == night_no + 1


def test_reader_during_commit_sees_old_or_new_never_a_mix(lake):
    lake.commit_run("r000", {"scores": scores(100), "samples": samples(100)}, score_key="k")
    reader = lake.con.cursor()  # another connection to the same instance (a DuckDB-file catalog is one process)
    both = "SELECT (SELECT count(*) FROM lake.scores), (SELECT count(*) FROM lake.samples)"
    seen: list[tuple[int, int]] = []
    inside = threading.Event()
    go_on = threading.Event()

    def read_while_open():
        inside.wait(30)
        seen.append(reader.execute(both).fetchone())
        go_on.set()

    thread = threading.Thread(target=read_while_open)
    thread.start()
    with lake.transaction("r001") as con:
        con.execute("INSERT INTO lake.scores BY NAME SELECT 'r001' AS run_id, 'k' AS score_key, 'x' AS sample_id")
        inside.set()  # half the run is written: the reader must not see it
        assert go_on.wait(30)
        con.execute("INSERT INTO lake.samples BY NAME SELECT 'r001' AS run_id, 'x' AS sample_id")
    thread.join()
    assert seen == [(100, 100)]
    assert reader.execute(both).fetchone() == (101, 101)


def test_error_mid_commit_leaves_previous_snapshot(lake):
    lake.commit_run("r000", {"scores": scores(100)}, score_key="k")
    before = lake.snapshots()
    bad = pa.table({"dataset": ["d"], "no_such_column": [1]})
    with pytest.raises(ValueError, match="no_such_column"):  # scores are inserted first, then this fails
        lake.commit_run("r001", {"scores": scores(150), "samples": bad}, score_key="k")
    assert lake.snapshots() == before
    assert count(lake.con, "SELECT count(*) FROM lake.scores") == 100
    assert count(lake.con, "SELECT count(*) FROM lake.runs") == 1


def test_killed_writer_leaves_previous_snapshot(tmp_path):
    root = tmp_path / "store"
    with Lake(root) as lk:
        lk.commit_run("r000", {"scores": scores(100)}, score_key="k")
        before = lk.snapshots()
    script = textwrap.dedent(
        f"""
        import os, pyarrow as pa
        from gradsift.storage.lake import Lake
        lk = Lake({str(root)!r}, inline_rows=0).open()
        lk.con.execute("BEGIN")
        lk.con.execute("INSERT INTO lake.scores BY NAME SELECT 'r001' AS run_id, 'k' AS score_key, "
                       "'s' || range AS sample_id FROM range(5000)")
        os._exit(9)  # killed mid-run: data files written, nothing committed
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    with Lake(root) as lk:
        assert lk.snapshots() == before
        assert count(lk.con, "SELECT count(*) FROM lake.scores") == 100
        lk.commit_run("r001", {"scores": scores(120)}, score_key="k")  # the next run commits as usual
        assert count(lk.con, "SELECT count(*) FROM lake.scores") == 120


def _env() -> dict[str, str]:
    paths = [p for p in sys.path if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *paths])}


def test_readonly_query_is_locked_down(lake, tmp_path):
    lake.commit_run("r000", night(50), run={"status": "completed"}, score_key="k")
    lake.commit_run("r001", night(60), run={"status": "completed"}, score_key="k")
    root = lake.root
    lake.close()  # a DuckDB-file catalog: one process at a time (readers wait for the writer)
    con = connect_readonly(root)
    try:
        assert query_readonly(con, "SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 60}]
        assert query_readonly(con, "SELECT count(*) AS n FROM mixtures").to_pylist() == [{"n": 2}]
        assert query_readonly(con, "SELECT count(*) AS n FROM mixtures_history").to_pylist() == [{"n": 4}]
        first = query_readonly(con, "SELECT min(snapshot_id) AS s FROM runs").to_pylist()[0]["s"]
        assert query_readonly(con, f"SELECT count(*) AS n FROM lake.scores AT (VERSION => {first})").to_pylist() == [
            {"n": 50}
        ]
        outside = tmp_path / "secret.csv"
        outside.write_text("a\n1\n")
        refused = [
            "INSERT INTO lake.scores BY NAME SELECT 'x' AS sample_id",
            f"SELECT * FROM read_csv('{outside}')",
            "SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)",
            "SELECT * FROM ducklake_expire_snapshots('lake', older_than => now())",
            "SELECT * FROM ducklake_merge_adjacent_files('lake')",
            "SELECT * FROM enable_logging(storage = 'file', storage_path = '/tmp')",
            "CALL ducklake_expire_snapshots('lake', older_than => now())",
        ]
        for sql in refused:
            with pytest.raises((ReadOnlyQueryError, duckdb.Error)):
                query_readonly(con, sql)
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error):
            con.execute("INSERT INTO lake.scores BY NAME SELECT 'x' AS sample_id")  # the attach itself is READ_ONLY
    finally:
        con.close()
    with Lake(root) as lk:  # nothing above changed the lake
        assert count(lk.con, "SELECT count(*) FROM lake.snapshots()") == len(lk.snapshots())
        assert count(lk.con, "SELECT count(*) FROM lake.scores") == 60


def test_compaction_keeps_current_state(tmp_path):
    with Lake(tmp_path / "store", inline_rows=0) as lk:
        for night_no in range(8):
            lk.commit_run(f"r{night_no:03d}", {"scores": scores(10 + night_no)}, score_key="k")
        files = sorted((lk.data_path).rglob("*.parquet"))
        lk.compact(older_than="0 seconds")
        assert count(lk.con, "SELECT count(*) FROM lake.scores") == 17
        assert len(sorted(lk.data_path.rglob("*.parquet"))) < len(files)


def _has_sqlite_scanner() -> bool:
    try:
        lakemod._extension("duckdb_extension_sqlite_scanner", "sqlite_scanner")
    except lakemod.LakeUnavailable:
        return False
    return True


@pytest.mark.skipif(not _has_sqlite_scanner(), reason="needs duckdb-extension-sqlite_scanner (same version as duckdb)")
def test_reader_in_another_process_during_commit_sqlite_catalog(tmp_path):
    """A SQLite catalog lets a reader process query while a writer process is half-way through a run."""
    root = tmp_path / "store"
    with Lake(root, "sqlite") as lk:
        lk.commit_run("r000", {"scores": scores(100), "samples": samples(100)}, score_key="k")
    half, done = tmp_path / "half-written", tmp_path / "go-on"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from gradsift.storage.lake import Lake
        lk = Lake({str(root)!r}, "sqlite", inline_rows=0).open()
        with lk.transaction("r001") as con:
            con.execute("INSERT INTO lake.scores BY NAME SELECT 'r001' AS run_id, 'k' AS score_key, "
                        "'n' || range AS sample_id FROM range(1000)")
            Path({str(half)!r}).touch()
            deadline = time.time() + 60
            while not Path({str(done)!r}).exists() and time.time() < deadline:
                time.sleep(0.05)
            con.execute("INSERT INTO lake.samples BY NAME SELECT 'r001' AS run_id, 'n' || range AS sample_id "
                        "FROM range(1000)")
        lk.close()
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", script], env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        con = connect_readonly(root, "sqlite")
        both = "SELECT (SELECT count(*) FROM scores), (SELECT count(*) FROM samples)"
        for _ in range(1200):
            if half.exists() or writer.poll() is not None:
                break
            threading.Event().wait(0.05)
        assert half.exists(), writer.stderr.read() if writer.poll() is not None else "writer never got half-way"
        assert con.execute(both).fetchone() == (100, 100)  # half a run is invisible
        done.touch()
        assert writer.wait(60) == 0, writer.stderr.read()
        assert con.execute(both).fetchone() == (1100, 1100)  # the same reader sees the new snapshot, whole
        con.close()
    finally:
        if writer.poll() is None:
            writer.kill()
