"""A nightly run with a target over a corpus that grew: the samples the score stage reuses (whole shards, and the old
samples of a partly scored shard) still feed influence."""

from __future__ import annotations

import json

import pytest

from gradsift.data.demo import write_demo_data
from gradsift.schemas.config import NightlyConfig
from gradsift.storage.catalog import query
from gradsift.storage.store import Store


def _cosine(store: Store) -> dict[str, float]:
    rows = query(store, "SELECT sample_id, score FROM influence WHERE method = 'cosine'").to_pylist()
    return {r["sample_id"]: r["score"] for r in rows}


@pytest.mark.usefixtures("prefect_harness", "ray_local")
def test_influence_reads_the_features_of_reused_shards_from_the_lake(tmp_path):
    from gradsift.flows.nightly import nightly_flow

    paths = write_demo_data(tmp_path / "data", n_per_domain=20, n_target=8)["paths"]
    sources = [
        {"path": paths["math"], "dataset": "math"},
        {"path": paths["reviews"], "dataset": "reviews"},
        {"path": paths["target"], "dataset": "target_math"},
    ]
    cfg = NightlyConfig.model_validate(
        {
            "store": str(tmp_path / "store"),
            "ingest": {"sources": sources, "shard_size": 64},
            "score": {"engine": {"micro_batch_size": 32}},
            "target": {"name": "math", "datasets": ["target_math"]},
        }
    )
    assert nightly_flow(cfg)["status"] == "completed"
    store = Store(cfg.store)
    first = _cosine(store)
    with open(paths["math"], "a") as fh:  # a new night: one more row in one source, the others unchanged
        fh.write(json.dumps({"prompt": "Question: 40 + 2?\nAnswer: ", "response": "#### 42"}) + "\n")
    night2 = nightly_flow(cfg)  # reviews and the target are reused, of math only the new row is scored
    assert night2["status"] == "completed" and night2["score"]["rows_scored"] == 1
    second = _cosine(store)
    assert len(second) == len(first) + 1
    # the reused shards' features (reviews) and the old samples' of the partly scored math shard came back from the
    # lake: the same influence as on night 1
    for sid, score in first.items():
        assert second[sid] == pytest.approx(score, rel=1e-5, abs=1e-6)
    assert query(store, "SELECT count(*) AS n FROM features").column("n")[0].as_py() == len(second) + 8
