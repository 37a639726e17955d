"""The DuckDB catalog: read-only SQL over the store's Parquet tables.

``catalog.duckdb`` holds only views (absolute paths) and is rebuilt as a temp file then
``os.replace``-d, so readers never see a half-built catalog and a writer never holds it open.
Derived tables show rows of completed runs only.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa

from gradsift.schemas.tables import TABLES
from gradsift.storage.store import Store

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float16(): "FLOAT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
}


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        return f"{_duck_type(t.value_type)}[]"
    return _DUCK_TYPES[t]


def _empty_select(schema: pa.Schema, with_run_id: bool) -> str:
    cols = [f"NULL::{_duck_type(f.type)} AS {f.name}" for f in schema]
    if with_run_id:
        cols.insert(0, "NULL::VARCHAR AS run_id")
    return f"SELECT {', '.join(cols)} WHERE false"


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def view_sql(store: Store, table: str, schema: pa.Schema | None) -> str:
    """The SELECT behind one view."""
    if table == "runs":
        if not any((store.tables / "runs").glob("*.parquet")):
            return _empty_select(TABLES["runs"], with_run_id=False)
        return f"SELECT * FROM read_parquet('{_sql_path(store.tables / 'runs')}/*.parquet', union_by_name=true)"
    if not store.table_has_data(table):
        if schema is None:  # features: dimension unknown until a run writes some
            return (
                "SELECT NULL::VARCHAR AS run_id, NULL::VARCHAR AS checkpoint, NULL::VARCHAR AS dataset, "
                "NULL::VARCHAR AS sample_id, NULL::FLOAT[] AS feature WHERE false"
            )
        return _empty_select(schema, with_run_id=True)
    glob = f"{_sql_path(store.tables / table)}/run_id=*/*.parquet"
    body = (
        f"SELECT * FROM read_parquet('{glob}', hive_partitioning=true, union_by_name=true, "
        "hive_types={'run_id': VARCHAR}) WHERE run_id IN (SELECT run_id FROM runs WHERE status = 'completed')"
    )
    if table == "samples":  # one row per (dataset, sample_id), the latest ingest wins; joins USING (sample_id)
        body = (  # stay unambiguous, so its run column is called ingest_run_id
            f"SELECT * EXCLUDE (run_id), run_id AS ingest_run_id FROM ({body}) "
            "QUALIFY row_number() OVER (PARTITION BY dataset, sample_id ORDER BY ingest_run_id DESC) = 1"
        )
    return body


def build_catalog(store: Store) -> Path:
    """(Re)build ``catalog.duckdb`` atomically; returns its path."""
    store.ensure()
    tmp = store.root / f".catalog.{uuid.uuid4().hex}.duckdb"
    con = duckdb.connect(str(tmp))
    try:
        for table, schema in [*TABLES.items(), ("features", None)]:
            con.execute(f"CREATE VIEW {table} AS {view_sql(store, table, schema)}")
    finally:
        con.close()
    os.replace(tmp, store.catalog_path)
    return store.catalog_path


class ReadOnlyQueryError(RuntimeError):
    """A statement tried to change the catalog."""


def connect_readonly(store: Store) -> duckdb.DuckDBPyConnection:
    if not store.catalog_path.exists():
        raise FileNotFoundError(
            f"no catalog at {store.catalog_path}: run a flow first (e.g. `gradsift demo` or `gradsift score`) "
            "or point --store at an existing store"
        )
    return duckdb.connect(str(store.catalog_path), read_only=True)


def query(store: Store, sql: str) -> pa.Table:
    """Run read-only SQL against the catalog and return an Arrow table."""
    con = connect_readonly(store)
    try:
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as err:
        if "read-only" in str(err).lower():
            raise ReadOnlyQueryError(
                "the catalog is read-only: gradsift query runs SELECTs only. Tables change through flows "
                f"(gradsift score / nightly / select). DuckDB said: {err}"
            ) from err
        raise
    finally:
        con.close()
