"""Curation stages and analyses through Prefect + local Ray: nightly with a target, pairs, fast/slow."""

from __future__ import annotations

from pathlib import Path

from gradsift.data.demo import write_demo_data
from gradsift.schemas.config import AnalyzeConfig, NightlyConfig
from gradsift.storage.catalog import query
from gradsift.storage.store import Store


def test_nightly_with_target(tmp_path, prefect_harness, ray_local):
    from gradsift.flows.nightly import nightly_flow

    paths = write_demo_data(tmp_path / "data", n_per_domain=40, n_target=20)["paths"]
    sources = [
        {"path": paths["math"], "dataset": "math"},
        {"path": paths["code"], "dataset": "code", "prompt": "instruction", "response": "output"},
        {"path": paths["target"], "dataset": "target_math"},
    ]
    cfg = NightlyConfig.model_validate(
        {
            "store": str(tmp_path / "store"),
            "ingest": {"sources": sources, "shard_size": 32},
            "score": {"engine": {"feature_dim": 512, "micro_batch_size": 32}},
            "target": {"name": "math", "datasets": ["target_math"], "methods": ["cosine", "tracin"], "block_rows": 40},
            "mixture": {"budget": 20},
        }
    )
    result = nightly_flow(cfg)
    assert result["status"] == "completed" and result["influence"]["blocks"] >= 2
    store = Store(cfg.store)
    n_train = query(store, "SELECT count(*) AS n FROM samples WHERE dataset <> 'target_math'").column("n")[0].as_py()
    infl = query(
        store, "SELECT method, count(*) AS n, min(rank) AS lo, max(rank) AS hi FROM influence GROUP BY 1 ORDER BY 1"
    )
    assert infl.to_pylist() == [{"method": m, "n": n_train, "lo": 0, "hi": n_train - 1} for m in ("cosine", "tracin")]
    kept = query(
        store, "SELECT selection, count(*) FILTER (kept) AS k FROM selections GROUP BY 1 ORDER BY 1"
    ).to_pylist()
    assert {r["selection"]: r["k"] for r in kept} == {
        "math-cosine-top0.05": round(0.05 * n_train),
        "math-mixture-20": 20,
    }
    w = query(store, "SELECT sum(weight) AS s, count(*) AS n FROM mixtures").to_pylist()[0]
    assert abs(w["s"] - 1) < 1e-9 and w["n"] == 2
    topk = query(store, "SELECT count(*) AS n FROM influence_topk WHERE method = 'cosine'").column("n")[0].as_py()
    assert topk == 20 * 10
    assert (Path(cfg.store) / "reports" / result["run_id"] / "influence.png").exists()


def test_pairs_and_fast_slow_on_shared_data(tmp_path, prefect_harness, ray_local, shared_data):
    from gradsift.flows.analyze import analyze_flow

    store = tmp_path / "store"
    common = {"store": str(store), "model": {"max_tokens": 128}}
    pairs = analyze_flow(
        AnalyzeConfig(data=str(shared_data / "hh_rlhf_harmless/test.jsonl.gz"), pairs={"limit": 24}, **common)
    )
    fast = analyze_flow(AnalyzeConfig(data=str(shared_data / "gsm8k/test.jsonl"), fast_slow={"limit": 16}, **common))
    assert pairs["status"] == fast["status"] == "completed"
    rows = query(Store(store), "SELECT * FROM pair_scores").to_pylist()
    assert len(rows) == 24
    assert pairs["pairs"]["truncated"] == sum(r["truncated"] for r in rows) > 0  # 128 byte tokens: most are cut
    for r in rows:
        assert abs(r["condition_ratio"] - r["dot"] / min(r["norm_chosen"], r["norm_rejected"]) ** 2) < 1e-9
    curves = query(Store(store), "SELECT variant, count(*) AS n FROM layer_curves GROUP BY 1 ORDER BY 1").to_pylist()
    assert curves == [{"variant": "fast", "n": 8}, {"variant": "slow", "n": 8}]  # 2 layers x q/k/v/o
    assert query(Store(store), "SELECT count(*) AS n FROM layer_diffs").column("n")[0].as_py() > 0


def test_fast_slow_quarantines_bad_problems(tmp_path, prefect_harness, ray_local):
    import json

    from gradsift.flows.analyze import analyze_flow

    data = tmp_path / "gsm.jsonl"
    good = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(4)]
    bad = [{"question": "no answer"}, {"question": "q", "answer": 7}, {"question": " ", "answer": "x"}, [1]]
    data.write_text("".join(json.dumps(r) + "\n" for r in good[:2] + bad + good[2:]) + "{broken\n")
    store = tmp_path / "store"
    result = analyze_flow(AnalyzeConfig(data=str(data), store=str(store), fast_slow={"limit": 10}))
    assert result["status"] == "completed" and result["fast_slow"]["quarantined"] == 5
    reasons = query(Store(store), "SELECT line, reason, detail FROM quarantine ORDER BY line").to_pylist()
    assert [(r["line"], r["reason"]) for r in reasons] == [
        (3, "missing_field"), (4, "wrong_type"), (5, "empty_text"), (6, "not_an_object"), (9, "invalid_json")
    ]  # fmt: skip
    assert reasons[0]["detail"].startswith("field 'answer' is missing") and all(r["detail"] for r in reasons)
    assert query(Store(store), "SELECT max(n_samples) AS n FROM layer_curves").column("n")[0].as_py() == 4
