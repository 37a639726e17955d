"""The README's SQL runs: every ```sql block and every `gradsift query "..."` example, against a store the nightly
flow built from the demo data (with a target and mixture weights, as `gradsift demo` does)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradsift.data.demo import write_demo_data
from gradsift.schemas.config import NightlyConfig
from gradsift.storage.catalog import query
from gradsift.storage.store import Store

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_sql() -> list[str]:
    text = README.read_text()
    statements = []
    for block in re.findall(r"```sql\n(.*?)```", text, re.S):
        body = "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))
        statements += [s.strip() for s in body.split(";") if s.strip()]
    for example in re.findall(r'gradsift query "(.*?)"', text, re.S):
        if example.upper().startswith("SELECT"):
            statements.append(" ".join(example.split()))
    return statements


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, prefect_harness, ray_local) -> Store:
    from gradsift.flows.nightly import nightly_flow

    folder = tmp_path_factory.mktemp("readme")
    paths = write_demo_data(folder / "data", n_per_domain=30, n_target=12)["paths"]
    sources = [
        {"path": paths["math"], "dataset": "math"},
        {"path": paths["reviews"], "dataset": "reviews"},
        {"path": paths["code"], "dataset": "code", "prompt": "instruction", "response": "output"},
        {"path": paths["target"], "dataset": "target_math"},
    ]
    cfg = NightlyConfig.model_validate(
        {
            "store": str(folder / "store"),
            "ingest": {"sources": sources, "shard_size": 64},
            "score": {"engine": {"micro_batch_size": 32}},
            "target": {"name": "math", "datasets": ["target_math"]},
            "mixture": {},
        }
    )
    assert nightly_flow(cfg)["status"] == "completed"
    return Store(cfg.store)


def test_readme_has_sql_examples():
    assert len(readme_sql()) >= 8


@pytest.mark.parametrize("sql", readme_sql())
def test_readme_sql_runs(sql, demo_store):
    if "'...'" in sql:  # placeholders for two sample ids
        a, b = query(demo_store, "SELECT sample_id FROM features LIMIT 2").column("sample_id").to_pylist()
        sql = sql.replace("'...'", f"'{a}'", 1).replace("'...'", f"'{b}'", 1)
    result = query(demo_store, sql)
    assert result.num_columns > 0
    if "FROM influence" not in sql:  # the demo's influence has no 'less' method (that needs checkpoints)
        assert result.num_rows > 0, sql
