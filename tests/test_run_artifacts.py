"""A run's artifacts (manifests, reports) are staged with it and appear only when it commits.

The select flow runs on a hand-built store (a completed "train run" of samples and scores: no model, no
Ray); the report is the curation report stage on staged tables.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from gradsift.schemas.tables import MIXTURES, SAMPLES, SCORES
from gradsift.storage.catalog import query
from gradsift.storage.store import RunStaging, Store

TRAIN_RUN = "train-tiny"


class Killed(Exception):
    """Stands for the process dying at that point."""


def tiny_train_store(root) -> Store:
    store = Store(root).ensure()
    staging = store.staging(TRAIN_RUN)
    samples = [
        {"dataset": "d", "sample_id": f"s{i}", "label": "pos" if i % 2 else "neg", "text": f"text {i}"}
        | {"record": json.dumps({"text": f"text {i}", "n": i})}
        for i in range(10)
    ]
    staging.write_part("samples", "d-00000-0123456789", pa.Table.from_pylist(samples, schema=SAMPLES))
    scores = [
        {"checkpoint": "final", "dataset": "d", "sample_id": f"s{i}", "el2n": float(i), "never_learned": False}
        for i in range(10)
    ]
    staging.write_part("scores", "train", pa.Table.from_pylist(scores, schema=SCORES))
    staging.commit({"run_id": TRAIN_RUN, "flow": "train", "status": "completed"})
    staging.finish()
    return store


def select_config(store: Store):
    from gradsift.schemas.train import SelectConfig

    return SelectConfig(
        store=str(store.root), scores_run=TRAIN_RUN, score="el2n", fractions=[0.5], drop="easy", stratify="none"
    )


def manifests_outside_staging(store: Store) -> list:
    return sorted(p for p in (store.root / "manifests").rglob("*") if p.is_file())


def test_select_killed_after_its_manifests_leaves_none_and_a_rerun_commits_them(tmp_path, prefect_harness, monkeypatch):
    from gradsift.flows.select import select_flow

    store = tiny_train_store(tmp_path / "store")

    def killed(self, *args, **kwargs):
        raise Killed("killed after the manifest stage, before the commit")

    monkeypatch.setattr(RunStaging, "commit", killed)
    with pytest.raises(Killed):
        select_flow(select_config(store))
    [run] = [r for r in store.runs() if r["flow"] == "select"]
    assert run["status"] == "failed"  # its runs row, committed alone
    staged = store.staging(run["run_id"]).artifact_dir("manifests")
    assert sorted(p.suffix for p in staged.iterdir()) == [".jsonl", ".parquet"]  # written, in staging
    assert manifests_outside_staging(store) == []
    assert not (store.root / "manifests" / run["run_id"]).exists()

    monkeypatch.undo()
    result = select_flow(select_config(store))
    assert result["status"] == "completed" and result["run_id"] == run["run_id"]
    [name] = result["selections"]
    final = store.root / "manifests" / run["run_id"]
    assert manifests_outside_staging(store) == [final / f"{name}.jsonl", final / f"{name}.parquet"]
    lines = (final / f"{name}.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["record"] == {"text": "text 9", "n": 9}  # hardest first
    assert not store.staging(run["run_id"]).dir.exists()


def test_select_killed_after_its_commit_gets_its_manifests_from_the_same_command(
    tmp_path, prefect_harness, monkeypatch
):
    """Killed after the lake commit, before the manifests move into place: the rerun finds the run completed, moves
    them and redoes nothing (the commit itself is one transaction: there is no commit half-done to finish)."""
    import gradsift.flows.select as select_mod

    store = tiny_train_store(tmp_path / "store")

    def killed(self):
        raise Killed("killed after the lake commit, before the artifacts")

    monkeypatch.setattr(RunStaging, "finish", killed)
    with pytest.raises(Killed):
        select_mod.select_flow(select_config(store))
    [run] = [r for r in store.runs() if r["flow"] == "select"]
    run_id = run["run_id"]
    assert run["status"] == "completed" and store.staging(run_id).staged()[1] == ["manifests"]
    assert manifests_outside_staging(store) == []

    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(select_mod, "select_one", lambda *a: calls.append(a))  # the body must not run again
    result = select_mod.select_flow(select_config(store))
    assert result["status"] == "already completed" and calls == [] and result["rows"] == 10
    assert [p.suffix for p in manifests_outside_staging(store)] == [".jsonl", ".parquet"]
    got = query(
        store, "SELECT count(*) FILTER (kept) AS k, count(*) AS n FROM selections WHERE run_id = $r", {"r": run_id}
    )
    assert got.to_pylist() == [{"k": 5, "n": 10}]
    assert not store.staging(run_id).dir.exists()


def test_report_is_staged_until_the_run_commits(tmp_path, monkeypatch):
    import gradsift.flows.influence as influence_mod
    from gradsift.flows.runs import RunRecorder
    from gradsift.schemas.config import NightlyConfig

    monkeypatch.setattr(influence_mod, "create_markdown_artifact", lambda *a, **k: None)  # no Prefect here
    store = Store(tmp_path / "store").ensure()
    cfg = NightlyConfig(store=str(store.root))
    recorder = RunRecorder(store, "nightly-tiny", "nightly", cfg, "m", "")
    recorder.start()
    mixtures = [{"domain": d, "weight": 0.5, "alignment": 0.1, "prior": 0.5, "n_samples": 3} for d in ("a", "b")]
    recorder.staging.write_part("mixtures", "weights", pa.Table.from_pylist(mixtures, schema=MIXTURES))
    result = influence_mod.report_stage.fn(cfg, store, recorder.run_id, {})
    final = store.root / "reports" / recorder.run_id
    assert result.report == str(final / "index.html")  # the path it will have
    assert (recorder.staging.artifact_dir("reports") / "mixtures.png").exists()
    assert not (store.root / "reports").exists()  # the run has not committed: nothing outside staging
    recorder.fail(Killed("before the commit"))

    again = RunRecorder(store, "nightly-tiny", "nightly", cfg, "m", "")
    again.start()
    again.complete(result.model_dump())
    assert sorted(p.name for p in final.iterdir()) == ["index.html", "mixtures.png"]
    assert store.read_run("nightly-tiny")["status"] == "completed"


def test_select_runs_without_prefect_unless_a_server_is_configured(tmp_path, monkeypatch):
    import gradsift.flows.select as select_mod

    store = tiny_train_store(tmp_path / "store")
    flows = []
    monkeypatch.setattr(select_mod, "select_flow", lambda config: flows.append(config) or {"flow": True}, raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = select_mod.select(select_config(store))
    assert result["status"] == "completed" and flows == []
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert select_mod.select(select_config(store)) == {"flow": True} and len(flows) == 1
