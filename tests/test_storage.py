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
