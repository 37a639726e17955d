"""The units of training work the executor runs (one per seed, or per group of retrainings): configs and
staging paths in, Parquet parts and small metadata out (no prefect or ray)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradsift.models.checkpoints import (
    list_checkpoints,
)
from gradsift.schemas.train import Budget, TrainConfig
from gradsift.signals import dynamics as dyn
from gradsift.storage.store import Store
from gradsift.training.loop import checkpoint_scores, evaluate, say, train, visit_scores
from gradsift.training.proxy import build_proxy, load_train_data, rebind, threshold_samples


def train_and_score_seed(cfg: TrainConfig, base_model: str, run_id: str, seed: int, label_index: dict | None) -> dict:
    """One seed of a train run, resumably: train (dynamics parts and checkpoints), then its per-seed
    scores as the scratch part ``seed_scores/seed<k>`` (``staging.scratch``: read by the flow, which combines
    the seeds, and never committed). Returns small metadata.

    With ``cfg.aum_threshold_samples`` the seed's threshold samples get no scores (NaN) and the seed's
    AUM threshold (99th percentile of their AUM) is returned."""
    staging = Store(cfg.store).staging(run_id)
    part, train_run_id = f"seed{seed}", f"{run_id}-seed{seed}"
    if not staging.scratch.has_part("seed_scores", part):
        rows = staging.read("samples").to_pylist()
        ids = [r["sample_id"] for r in rows]
        fake = np.zeros(len(rows), dtype=bool)
        if cfg.aum_threshold_samples and label_index:
            rows, label_index, fake = threshold_samples(rows, label_index, seed)
        data = load_train_data(cfg, base_model, rows, label_index)
        _, infos = train(
            cfg,
            base_model,
            data,
            seed,
            cfg.store,
            train_run_id,
            lambda epoch, table: staging.write_part("dynamics", f"{part}-epoch{epoch:03d}", table),
            say=say,
        )
        proxies = [build_proxy(cfg, base_model, data, seed, info) for info in infos]
        what = "gradient and forward scores" if cfg.gradient_scores else "forward scores only"
        say(f"{train_run_id}: scoring {len(ids)} samples at {len(infos)} checkpoints ({what})")
        scores = checkpoint_scores(
            proxies, [c.lr for c in infos], cfg.score_epoch - 1, cfg.score_batch_size, cfg.gradient_scores
        )
        epochs = [p for p in staging.parts("dynamics") if p.name.startswith(f"{part}-epoch")]
        dynamics = pa.concat_tables([pq.read_table(p) for p in epochs])
        scores.update(visit_scores(dynamics, ids))
        threshold = dyn.aum_threshold(scores["aum"][fake]) if fake.any() else np.nan
        scores = {k: np.where(fake, np.nan, v.astype(np.float64)) for k, v in scores.items()}
        scores["aum_threshold"] = np.full(len(ids), threshold)
        staging.scratch.write_part("seed_scores", part, pa.table({"sample_id": ids, **scores}))
    threshold = pq.read_table(staging.scratch.part_path("seed_scores", part), columns=["aum_threshold"])[0][0].as_py()
    return {
        "seed": seed,
        "train_run_id": train_run_id,
        "checkpoints": len(list_checkpoints(cfg.store, train_run_id)),
        "aum_threshold": None if np.isnan(threshold) else threshold,
    }


def budget_epochs(epochs: int, n_all: int, n_kept: int, budget: Budget) -> int:
    """Epochs to retrain a selection of ``n_kept`` of ``n_all`` samples: the same ``epochs`` (a pruned set
    costs less), or under ``budget="steps"`` about as many optimiser steps as all data (epochs * all / kept)."""
    return epochs if budget == "epochs" else round(epochs * n_all / max(n_kept, 1))


def evaluate_selections(
    cfg: TrainConfig,
    base_model: str,
    train_parts: list[str],
    eval_parts: list[str],
    label_index: dict,
    jobs: list,
    budget: Budget = "epochs",
) -> list[dict]:
    """Retrain from the same start (the seed's initialisation) on each selection and measure held-out
    accuracy and loss. ``jobs``: (selection, kept sample ids or None for all, seed). Returns one row each."""
    train_data = load_train_data(cfg, base_model, _read_rows(train_parts), label_index)
    eval_data = load_train_data(cfg, base_model, _read_rows(eval_parts), label_index)
    ids = np.array([r["sample_id"] for r in train_data.rows])
    out = []
    for k, (selection, kept_ids, seed) in enumerate(jobs, 1):
        started = time.perf_counter()
        data = train_data if kept_ids is None else train_data.subset(np.isin(ids, list(kept_ids)))
        epochs = budget_epochs(cfg.epochs, len(ids), len(data.rows), budget)
        run_cfg = cfg.model_copy(update={"epochs": epochs})
        proxy, _ = train(run_cfg, base_model, data, seed)
        accuracy, loss = evaluate(rebind(proxy, run_cfg, eval_data))
        say(
            f"retrained {k}/{len(jobs)}: {selection} seed {seed}, {len(data.rows)} samples x {epochs} epochs: "
            f"held-out accuracy {accuracy:.4f}, loss {loss:.4f} ({time.perf_counter() - started:.0f} s)"
        )
        out.append(
            {
                "selection": selection,
                "seed": seed,
                "n_train": len(data.rows),
                "epochs": epochs,
                "accuracy": accuracy,
                "loss": loss,
            }
        )
    return out


def _read_rows(parts: list[str]) -> list[dict]:
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()
