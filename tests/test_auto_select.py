"""``select --auto`` on generated embeddings where one direction is planted to win; the direction rule."""

from __future__ import annotations

import numpy as np
import pytest

from gradsift.selection.auto import auto_select, choose
from gradsift.selection.direction import direction_rule, first_learned, visits_direction


def _planted(n: int = 1200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes along dimension 0, and 12% mislabelled high-leverage outliers (far out on the class-1
    side, labelled 0): they drag a linear head's boundary, so dropping the hard samples (them) wins."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 8)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 1.5, -1.5)
    bad = rng.random(n) < 0.12
    x[bad, 0] = rng.normal(8.0, 0.5, bad.sum())
    y[bad] = 0
    return x, y


def test_auto_picks_the_planted_direction():
    x, y = _planted()
    result = auto_select(x, y, fractions=(0.55,), seeds=(0, 1, 2), budget=30, epochs=6)
    assert result.chosen is not None, result.reason
    assert result.chosen.drop == "hard" and result.chosen.fraction == 0.55
    assert {t["candidate"] for t in result.trials} >= {"all", "random-keep0.55", "el2n-drop-easy-keep0.55"}
    assert sum(t["chosen"] for t in result.trials) == 3
    assert len(result.trials) <= 30


def test_without_a_margin_over_random_nothing_is_chosen():
    rows = [{"candidate": c, "score": s, "drop": d, "fraction_kept": 0.55, "accuracy": a}
            for c, s, d, accs in (("random-keep0.55", "random", "", (0.80, 0.84)),
                                  ("el2n-drop-easy-keep0.55", "el2n", "easy", (0.83, 0.83)))
            for a in accs]  # fmt: skip
    chosen, reason = choose(rows)
    assert chosen is None and "spread" in reason
    rows[-2:] = [{**rows[-1], "accuracy": 0.9}, {**rows[-1], "accuracy": 0.9}]
    assert choose(rows)[0].drop == "easy"


def test_the_direction_rule_reads_accuracy_and_dynamics():
    early = np.ones((100, 8), dtype=bool)
    early[:, 0] = False
    assert direction_rule(0.92, early).drop == "easy"
    assert direction_rule(0.70, early).drop == "hard"  # low held-out accuracy: scarce
    late = np.zeros((100, 8), dtype=bool)
    late[:, 6:] = True
    assert direction_rule(0.92, late).drop == "hard"  # learned late
    never = early.copy()
    never[:30] = False
    assert direction_rule(0.92, never).drop == "hard" and "never learned 30.0%" in direction_rule(0.92, never).reason
    still_learning = early.copy()
    still_learning[:20, 6] = False  # 80% right in the epoch before the last, 100% in the last
    rule = direction_rule(0.92, still_learning)
    assert rule.drop == "hard" and rule.last_epoch_gain == pytest.approx(0.2)  # the step budget is short: scarce
    assert "training accuracy +20.0% over the last epoch" in rule.reason
    np.testing.assert_array_equal(first_learned(np.array([[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], bool)), [3, 0, 4])


def test_select_auto_flow_on_a_frozen_sentence_pair_run(tmp_path, prefect_harness):
    """train (frozen MiniLM, sentence pairs) -> select --auto: every trial in selection_trials, the choice and its
    reason in selections, the trials plot with the run."""
    import json

    from gradsift.flows.select import select_flow
    from gradsift.flows.train import train_flow
    from gradsift.schemas.train import SelectConfig, TrainConfig
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store

    path = tmp_path / "pairs.jsonl"
    words = {
        "yes": ["a dog runs", "a cat sleeps", "a man sings"],
        "no": ["nothing moves", "nobody is here", "all quiet"],
    }
    path.write_text("".join(
        json.dumps({"premise": f"scene {i}: {words['yes'][i % 3]}", "hypothesis": words[lab][i % 3], "label": lab}) + "\n"
        for i, lab in ((i, "yes" if i % 2 else "no") for i in range(40))
    ))  # fmt: skip
    cfg = TrainConfig(
        store=str(tmp_path / "store"),
        data={"path": str(path), "text": "premise", "text_pair": "hypothesis"},
        model="minilm",
        mode="frozen",
        epochs=3,
        lr=1e-2,
        batch_size=8,
        embed_cache=str(tmp_path / "emb"),
    )
    run = train_flow(cfg)["run_id"]
    out = select_flow(SelectConfig(store=cfg.store, scores_run=run, auto=True, fractions=[0.5], budget=12))
    store = Store(cfg.store)
    trials = query(store, "SELECT candidate, seed, accuracy, chosen FROM selection_trials").to_pylist()
    assert len(trials) == 12 and {t["candidate"] for t in trials} >= {"all", "random-keep0.50"}
    reasons = query(store, "SELECT DISTINCT selection, reason FROM selections").to_pylist()
    assert [r["selection"] for r in reasons] == out["selections"] and reasons[0]["reason"].startswith("auto: ")
    assert "Sorscher" in reasons[0]["reason"]
    pairs = query(store, "SELECT count(*) AS n FROM samples WHERE text_pair IS NOT NULL").to_pylist()
    assert pairs == [{"n": 40}]
    default = select_flow(SelectConfig(store=cfg.store, scores_run=run, score="el2n", fractions=[0.5]))
    [row] = query(store, "SELECT config FROM runs WHERE run_id = $r", {"r": default["run_id"]}).to_pylist()
    drop = json.loads(row["config"])["drop"]  # the resolved direction is what the run records
    assert drop in ("easy", "hard") and default["selections"] == [f"el2n-keep-drop-{drop}-keep0.50-seed0"]
    [reason] = query(store, "SELECT DISTINCT reason FROM selections WHERE run_id = $r", {"r": default["run_id"]})[
        "reason"
    ].to_pylist()
    assert "direction rule (no --drop): proxy held-out accuracy" in reason and f"drop {drop}" in reason
    assert default["reason"] == reason.split("; ", 1)[1]  # the CLI prints it


def test_the_rule_on_a_visit_log_reads_progressive_accuracy():
    """Two seeds x 4 samples x 3 epochs of visits: accuracy from the second half of each seed's first epoch."""
    ck, sid, epoch, step, correct = [], [], [], [], []
    for seed in range(2):
        for e in range(3):
            for i in range(4):
                ck.append(f"r-seed{seed}"), sid.append(f"s{3 - i}"), epoch.append(e + 1), step.append(4 * e + i)
                correct.append(e > 0 or i >= 2)  # first epoch: the later half right
    arrays = [np.array(v) for v in (ck, sid, epoch, step, correct)]
    rule = visits_direction(*arrays)
    assert rule.accuracy == 1.0 and rule.never_learned == 0.0 and rule.drop == "easy"
    assert "progressive accuracy (first epoch, second half) 1.000" in rule.reason
    arrays[4] = np.where(arrays[2] == 1, np.arange(24) % 4 < 2, arrays[4])  # the later half wrong
    assert visits_direction(*arrays).accuracy == 0.0 and visits_direction(*arrays).drop == "hard"


def test_nightly_auto_select_section(tmp_path, prefect_harness, ray_local):
    """The nightly config's auto_select section: trials and the choice of the run's labelled samples in
    selection_trials and selections, committed with the nightly run."""
    import json

    from gradsift.flows.nightly import nightly_flow
    from gradsift.schemas.config import NightlyConfig
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store

    path = tmp_path / "rows.jsonl"
    words = {"pos": ["a fine sunny day", "we loved it", "great fun"], "neg": ["a cold grey day", "we hated it", "dull"]}
    path.write_text("".join(
        json.dumps({"text": f"note {i}: {words[lab][i % 3]}", "label": lab}) + "\n"
        for i, lab in ((i, "pos" if i % 2 else "neg") for i in range(40))
    ))  # fmt: skip
    cfg = NightlyConfig.model_validate({
        "store": str(tmp_path / "store"),
        "ingest": {"sources": [{"path": str(path), "dataset": "notes"}], "shard_size": 16},
        "ray": {"num_actors": 1},
        "auto_select": {"fractions": [0.5], "budget": 12, "epochs": 3, "embed_cache": str(tmp_path / "emb")},
    })  # fmt: skip
    out = nightly_flow(cfg)
    assert out["auto_select"]["selection"] in ("auto-keep1.00", "auto-keep0.50") and out["auto_select"]["rows"] == 40
    store = Store(cfg.store)
    trials = query(store, "SELECT run_id, candidate FROM selection_trials").to_pylist()
    assert len(trials) == 12 and {t["run_id"] for t in trials} == {out["run_id"]}
    [reason] = query(store, "SELECT DISTINCT reason FROM selections").column("reason").to_pylist()
    assert reason.startswith("auto: ") and "Sorscher" in reason
