"""A locked-down reader over a bare lake (``storage.lake.Lake`` at ``root`` with ``catalog``), the way
``gradsift query`` reads a store: the store's ``lake.json`` names the catalog, ``storage.catalog`` attaches it."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa

from gradsift.storage.catalog import check_query, connect_readonly
from gradsift.storage.store import Store


def lake_reader(root: Path, catalog: str = "duckdb") -> duckdb.DuckDBPyConnection:
    (Path(root) / Store.CONFIG).write_text(json.dumps({"catalog": catalog}))
    return connect_readonly(Store(root))


def query_readonly(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """One read-only SELECT (gradsift's statement check plus the function denylist), as ``catalog.query`` runs it."""
    return con.sql(check_query(con, sql).query).to_arrow_table()
