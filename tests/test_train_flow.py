"""train -> select -> evaluate end to end through Prefect and local Ray, on tiny models and real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradsift.storage.catalog import query
from gradsift.storage.store import Store


def _toy_jsonl(path, n=48):
    words = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}
    with path.open("w") as fh:
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            fh.write(json.dumps({"text": f"{words[label][i % 3]} item number {i}", "label": label}) + "\n")
    return path


def test_train_select_evaluate_end_to_end(tmp_path, tiny_bert, prefect_harness, ray_local):
    from gradsift.flows.evaluate import evaluate_flow
    from gradsift.flows.select import select_flow
    from gradsift.flows.train import train_flow
    from gradsift.models.checkpoints import list_checkpoints, load_checkpoint
    from gradsift.schemas.train import EvaluateConfig, SelectConfig, TrainConfig

    data = _toy_jsonl(tmp_path / "toy.jsonl")
    store = str(tmp_path / "store")
    cfg = TrainConfig(
        store=store, data={"path": str(data)}, model=tiny_bert, epochs=2, batch_size=8, lr=1e-3, seeds=[0, 1]
    )
    result = train_flow(cfg)
    run_id = result["run_id"]
    assert result["status"] == "completed" and result["samples"] == 48

    # one dynamics row per visit; one scores row per sample with every training-dynamics column filled
    s = Store(store)
    assert query(s, "SELECT count(*) FROM dynamics").column(0)[0].as_py() == 48 * 2 * 2
    scores = query(s, "SELECT * FROM scores WHERE run_id = $run", {"run": run_id}).to_pandas()
    assert len(scores) == 48
    for col in ("el2n", "grand", "aum", "vog", "self_influence", "forgetting", "never_learned"):
        assert scores[col].notna().all(), col
    assert abs(scores["vog"].mean()) < 1e-6  # z-normalised per class

    # checkpoint contract: model/ (safetensors), optimizer.pt, meta.json with the step's lr
    infos = list_checkpoints(store, run_id)
    assert [(c.meta["seed"], c.epoch) for c in infos] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert (infos[0].path / "model" / "model.safetensors").exists() and (infos[0].path / "optimizer.pt").exists()
    model, tokenizer, optimizer_state, meta = load_checkpoint(infos[1])
    assert meta["lr"] > 0 and meta["step"] == 12 and meta["label_index"] == {"neg": 0, "pos": 1}
    assert optimizer_state["state"] and tokenizer is not None
    assert train_flow(cfg)["status"] == "already completed"

    sel = select_flow(SelectConfig(store=store, scores_run=run_id, score="el2n", fractions=[0.5]))
    rnd = select_flow(SelectConfig(store=store, scores_run=run_id, score=None, fractions=[0.5], seeds=[3]))
    kept = query(s, "SELECT selection, count(*) FILTER (kept) AS k, count(*) AS n FROM selections GROUP BY 1")
    assert sorted(kept.column("k").to_pylist()) == [24, 24] and set(kept.column("n").to_pylist()) == {48}
    manifest = (s.root / "manifests" / sel["run_id"] / f"{sel['selections'][0]}.jsonl").read_text().splitlines()
    assert len(manifest) == 24 and json.loads(manifest[0])["record"]["text"]

    ev = evaluate_flow(
        EvaluateConfig(
            store=store,
            train_run=run_id,
            selection_runs=[sel["run_id"], rnd["run_id"]],
            eval_data={"path": str(data)},
            seeds=[0],
            ray={"num_actors": 1},  # in process: Ray is covered by the train flow's two seeds
        )
    )
    table = query(s, "SELECT score, fraction_kept, n_train, accuracy FROM evaluations ORDER BY score").to_pylist()
    assert [r["score"] for r in table] == ["all", "el2n", "random"]
    assert [r["n_train"] for r in table] == [48, 24, 24] and all(0 <= r["accuracy"] <= 1 for r in table)
    assert ev["plot"] == str(s.root / "reports" / ev["run_id"] / "accuracy.png")  # staged, then committed there
    assert (s.root / "reports" / ev["run_id"] / "accuracy.png").exists() and not s.staging(ev["run_id"]).dir.exists()


def test_lora_causal_lm_train(tmp_path):
    """Run directly (no Prefect server configured): the same stages as the flow."""
    from gradsift.flows.train import train
    from gradsift.models.checkpoints import list_checkpoints, load_checkpoint
    from gradsift.schemas.train import TrainConfig

    data = _toy_jsonl(tmp_path / "toy.jsonl", n=16)
    cfg = TrainConfig(
        store=str(tmp_path / "store"),
        data={"path": str(data)},
        model="tiny",
        task="causal_lm",
        lora=True,
        epochs=2,
        batch_size=8,
        lr=1e-3,
    )
    result = train(cfg)
    infos = list_checkpoints(cfg.store, result["run_id"])
    assert (infos[-1].path / "model" / "adapter_model.safetensors").exists() and infos[-1].meta["lora"]
    model = load_checkpoint(infos[-1])[0]
    assert type(model).__name__.startswith("Peft")
    scores = query(Store(cfg.store), "SELECT el2n, grand, aum, vog, self_influence FROM scores").to_pandas()
    assert len(scores) == 16 and scores.notna().all().all()

    # a causal LM is evaluated by its held-out loss after retraining on a selection; at equal compute
    # (budget="steps") the half kept trains twice the epochs
    from gradsift.flows.evaluate import evaluate_flow
    from gradsift.flows.select import select_flow
    from gradsift.schemas.train import EvaluateConfig, SelectConfig

    rnd = select_flow(SelectConfig(store=cfg.store, scores_run=result["run_id"], score=None, fractions=[0.5]))
    ev = evaluate_flow(
        EvaluateConfig(
            store=cfg.store,
            train_run=result["run_id"],
            selection_runs=[rnd["run_id"]],
            eval_data={"path": str(data)},
            seeds=[0],
            ray={"num_actors": 1},
            budget="steps",
        )
    )
    rows = query(Store(cfg.store), "SELECT score, n_train, epochs, loss FROM evaluations ORDER BY score").to_pylist()
    assert [(r["score"], r["n_train"], r["epochs"]) for r in rows] == [("all", 16, 2), ("random", 8, 4)]
    assert all(0 < r["loss"] < 10 for r in rows) and ev["plot"].endswith("loss.png")


def test_aum_threshold_samples(tmp_path, prefect_harness):
    from gradsift.flows.train import train_flow
    from gradsift.schemas.train import TrainConfig

    cfg = TrainConfig(
        store=str(tmp_path / "store"),
        data={"path": str(_toy_jsonl(tmp_path / "toy.jsonl"))},
        model="minilm",
        mode="frozen",
        epochs=3,
        lr=1e-2,
        batch_size=8,
        aum_threshold_samples=True,
        embed_cache=str(tmp_path / "emb"),
    )
    result = train_flow(cfg)
    s = Store(cfg.store)
    assert isinstance(result["aum_threshold"], float) and 0 <= result["flagged"] <= 48
    assert f"aum_threshold={result['aum_threshold']:.6g}" in s.read_run(result["run_id"])["note"]
    nulls = query(s, "SELECT count(*) FILTER (aum IS NULL), count(*) FILTER (forgetting IS NULL) FROM scores")
    assert nulls.to_pylist()[0] == {k: 48 // 3 for k in nulls.column_names}  # N/(C+1) threshold samples


def test_without_gradient_scores(tmp_path):
    """gradient_scores=false: forward and dynamics scores only; selecting by a gradient score says why not
    (train and select run directly)."""
    from gradsift.flows.select import select
    from gradsift.flows.train import train
    from gradsift.schemas.train import SelectConfig, TrainConfig

    cfg = TrainConfig(
        store=str(tmp_path / "store"),
        data={"path": str(_toy_jsonl(tmp_path / "toy.jsonl", n=16))},
        model="tiny",
        epochs=2,
        batch_size=8,
        lr=1e-3,
        gradient_scores=False,
    )
    run = train(cfg)["run_id"]
    s = Store(cfg.store)
    row = query(s, "SELECT count(el2n) AS el2n, count(aum) AS aum, count(loss) AS loss, count(grand) AS grand, "
                   "count(vog) AS vog, count(self_influence) AS si FROM scores").to_pylist()[0]  # fmt: skip
    assert row == {"el2n": 16, "aum": 16, "loss": 16, "grand": 0, "vog": 0, "si": 0}
    with pytest.raises(ValueError, match="no grand scores.*gradient_scores=false"):
        select(SelectConfig(store=cfg.store, scores_run=run, score="grand"))
    assert select(SelectConfig(store=cfg.store, scores_run=run, score="aum", fractions=[0.5]))["selections"]


@pytest.mark.parametrize("name", ["sst2", "agnews"])
def test_frozen_minilm_small_real_data(name, tmp_path, shared_data, prefect_harness):
    """A few hundred real rows with the real encoder: frozen mode, scores, selection, evaluation."""
    from gradsift.flows.evaluate import evaluate_flow
    from gradsift.flows.select import select_flow
    from gradsift.flows.train import train_flow
    from gradsift.schemas.train import EvaluateConfig, SelectConfig, TrainConfig

    folder = shared_data / name
    train_file = folder / "train.tsv"
    eval_file = folder / ("dev.tsv" if name == "sst2" else "test.tsv")
    columns = None if name == "sst2" else ["text", "label"]
    text = "sentence" if name == "sst2" else "text"

    def head(path, n):
        out = tmp_path / f"{path.parent.name}-{path.name}"
        lines = path.read_text().splitlines()
        out.write_text("\n".join(lines[: n + (columns is None)]) + "\n")
        return {"path": str(out), "columns": columns, "text": text}

    store = str(tmp_path / "store")
    cfg = TrainConfig(
        store=store,
        data=head(train_file, 200),
        model="minilm",
        mode="frozen",
        epochs=4,
        lr=1e-2,
        batch_size=16,
        embed_cache=str(tmp_path / "emb"),
    )
    run_id = train_flow(cfg)["run_id"]
    sel = select_flow(SelectConfig(store=store, scores_run=run_id, score="aum", fractions=[0.7]))
    ev = evaluate_flow(
        EvaluateConfig(
            store=store, train_run=run_id, selection_runs=[sel["run_id"]], eval_data=head(eval_file, 120), seeds=[0]
        )
    )
    acc = {
        r["score"]: r["accuracy"] for r in query(Store(store), "SELECT score, accuracy FROM evaluations").to_pylist()
    }
    assert ev["evaluations"] == 2 and min(acc.values()) > (0.6 if name == "sst2" else 0.5), acc


def test_training_resumes_after_the_last_checkpoint(tmp_path):
    """A crash after epoch 1 (epoch 2's checkpoint missing) resumes from epoch 1 and ends identical."""
    import shutil

    import torch

    from gradsift.models.checkpoints import list_checkpoints
    from gradsift.models.loading import minilm_path
    from gradsift.schemas.train import TrainConfig
    from gradsift.training.loop import train
    from gradsift.training.proxy import TrainData

    rng = np.random.default_rng(0)
    rows = [{"dataset": "d", "sample_id": f"s{i}", "label": str(i % 3)} for i in range(40)]
    data = TrainData(rows, {"0": 0, "1": 1, "2": 2}, rng.normal(size=(40, 6)).astype(np.float32))
    cfg = TrainConfig(data={"path": str(tmp_path)}, mode="frozen", epochs=2, batch_size=8, lr=1e-2, head_hidden=4)
    epochs_run = []
    base = str(minilm_path())
    full, infos = train(cfg, base, data, 0, str(tmp_path / "a"), "r-seed0", lambda e, t: epochs_run.append(e))
    assert [c.step for c in infos] == [5, 10] and infos[0].lr == pytest.approx(1e-2 * (10 - 4) / 10)
    shutil.rmtree(infos[1].path)
    resumed, _ = train(cfg, base, data, 0, str(tmp_path / "a"), "r-seed0", lambda e, t: epochs_run.append(e))
    assert epochs_run == [1, 2, 2] and len(list_checkpoints(tmp_path / "a", "r-seed0")) == 2
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_score_epoch_after_the_last_epoch_is_refused(tmp_path):
    from pydantic import ValidationError

    from gradsift.schemas.train import TrainConfig

    with pytest.raises(ValidationError, match="score_epoch 2 is after the last epoch \\(1\\)"):
        TrainConfig(data={"path": str(tmp_path)}, epochs=1, score_epoch=2)
