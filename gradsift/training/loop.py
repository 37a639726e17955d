"""The proxy-training loop and what it measures (pure torch; no prefect or ray).

``train`` runs AdamW with a per-step learning rate, logs every sample visit (loss, pred, correct, margin,
EL2N), checkpoints after each epoch and resumes from the last one. ``checkpoint_scores`` and
``visit_scores`` turn checkpoints and visits into the score columns; ``evaluate`` is held-out accuracy/loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from gradsift.models.adapter import per_sample_loss
from gradsift.models.checkpoints import (
    CheckpointInfo,
    list_checkpoints,
    load_optimizer_state,
    save_checkpoint,
)
from gradsift.schemas.tables import DYNAMICS, SCORES
from gradsift.schemas.train import TrainConfig
from gradsift.signals import dynamics as dyn
from gradsift.training.proxy import Proxy, TrainData, build_proxy


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of 0-based step ``step`` of ``total``: linear warm-up, then constant or linear decay."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr if cfg.schedule == "constant" else cfg.lr * (total - step) / (total - warmup)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(
    cfg: TrainConfig,
    base_model: str,
    data: TrainData,
    seed: int,
    store_root: str | None = None,
    train_run_id: str | None = None,
    on_epoch: Callable[[int, pa.Table], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[Proxy, list[CheckpointInfo]]:
    """Train one seed for ``cfg.epochs``. With ``store_root``/``train_run_id`` it checkpoints after every
    epoch and resumes after the last checkpoint found; ``on_epoch(epoch, dynamics rows)`` gets the
    visit log of each epoch; ``say`` (e.g. print) gets progress lines. The data order of an epoch depends
    only on (seed, epoch)."""
    say = say or (lambda _: None)
    done = list_checkpoints(store_root, train_run_id) if store_root else []
    proxy = build_proxy(cfg, base_model, data, seed, done[-1] if done else None)
    optimizer = _optimizer(cfg, proxy.model)
    if done:
        optimizer.load_state_dict(load_optimizer_state(done[-1]))
    n, bs = len(proxy), cfg.batch_size
    per_epoch = -(-n // bs)
    total = per_epoch * cfg.epochs
    rows = data.rows
    name = train_run_id or f"seed{seed}"
    if len(done) < cfg.epochs:
        say(f"{name}: {n} samples, epochs {len(done) + 1}-{cfg.epochs} of {cfg.epochs}, {per_epoch} steps each")
    for epoch in range(len(done) + 1, cfg.epochs + 1):
        started = time.perf_counter()
        proxy.model.train()
        torch.manual_seed(seed * 100_003 + epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        log: dict[str, list] = {k: [] for k in ("idx", "step", "loss", "correct", "margin", "pred", "el2n")}
        for b in range(per_epoch):
            step = (epoch - 1) * per_epoch + b
            idx = order[b * bs : (b + 1) * bs]
            lr = lr_at(cfg, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits, labels = proxy.logits(idx)
            loss = per_sample_loss(logits, labels, proxy.task)
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            optimizer.step()
            stats = dyn.visit_stats(logits.detach(), labels, proxy.task, loss)
            log["idx"].append(idx)
            log["step"].append(np.full(len(idx), step + 1))
            for key in ("loss", "correct", "margin", "pred", "el2n"):
                log[key].append(stats[key].numpy())
            if per_epoch >= 200 and (b + 1) % (per_epoch // 4) == 0 and b + 1 < per_epoch:
                say(f"{name}: epoch {epoch}/{cfg.epochs} step {b + 1}/{per_epoch} ({_eta(started, b + 1, per_epoch)})")
        say(
            f"{name}: epoch {epoch}/{cfg.epochs} done in {time.perf_counter() - started:.0f} s, "
            f"mean loss {np.concatenate(log['loss']).mean():.4f}, accuracy on visits "
            f"{np.concatenate(log['correct']).mean():.4f}"
        )
        if on_epoch:
            on_epoch(epoch, _dynamics_table(log, rows, epoch, name))
        if store_root:
            proxy.model.eval()
            meta = {
                "step": epoch * per_epoch,
                "epoch": epoch,
                "lr": lr,
                "base_model": base_model,
                "lora": cfg.lora,
                "task": proxy.task,
                "label_index": data.label_index,
                "num_labels": len(data.label_index) if data.label_index else None,
                "mode": cfg.mode,
                "seed": seed,
                "base_seed": seed,
                "head_hidden": cfg.head_hidden,
                "input_dim": None if data.embeddings is None else int(data.embeddings.shape[1]),
            }
            done.append(save_checkpoint(store_root, train_run_id, proxy.model, optimizer, proxy.tokenizer, meta))
    proxy.model.eval()
    return proxy, done


def say(line: str) -> None:
    """A progress line, flushed at once (Ray forwards a worker's stdout only as it is written)."""
    print(line, flush=True)


def _eta(started: float, done: int, total: int) -> str:
    left = (time.perf_counter() - started) / done * (total - done)
    return f"about {left / 60:.1f} min left in the epoch"


def _dynamics_table(log: dict[str, list], rows: list[dict], epoch: int, checkpoint: str) -> pa.Table:
    idx = np.concatenate(log["idx"])
    cols = {k: np.concatenate(v) for k, v in log.items() if k != "idx"}
    return pa.table(
        {
            "checkpoint": [checkpoint] * len(idx),
            "epoch": pa.array(np.full(len(idx), epoch), pa.int32()),
            "step": pa.array(cols["step"], pa.int64()),
            "dataset": [rows[i]["dataset"] for i in idx],
            "sample_id": [rows[i]["sample_id"] for i in idx],
            "loss": pa.array(cols["loss"], pa.float32()),
            "correct": pa.array(cols["correct"], pa.bool_()),
            "margin": pa.array(cols["margin"], pa.float32()),
            "pred": pa.array(cols["pred"], pa.int32()),
            "el2n": pa.array(cols["el2n"], pa.float32()),
        },
        schema=DYNAMICS,
    )


def visit_scores(dynamics: pa.Table, sample_ids: list[str]) -> dict[str, np.ndarray]:
    """Forgetting events, never-learned flags and AUM of one seed from its visit log ([N] each, in
    ``sample_ids`` order; visits in step order)."""
    d = dynamics.select(["sample_id", "step", "correct", "margin"]).to_pandas().sort_values(["sample_id", "step"])
    pos = {s: i for i, s in enumerate(sample_ids)}
    v = len(d) // len(sample_ids)
    order = np.argsort([pos[s] for s in d["sample_id"].to_numpy()[::v]], kind="stable")
    correct = d["correct"].to_numpy().reshape(-1, v)[order]
    margins = d["margin"].to_numpy().reshape(-1, v)[order]
    events, never = dyn.forgetting(correct)
    return {"forgetting": events, "never_learned": never, "aum": dyn.aum(margins)}


def scores_table(checkpoint: str, datasets: list[str], sample_ids: list[str], combined: dict) -> pa.Table:
    """``scores`` rows of a train or captured run from ``combine_seeds``' columns (grad_norm: a score run's)."""
    n = len(sample_ids)
    table = pa.table(
        {
            "checkpoint": [checkpoint] * n,
            "dataset": datasets,
            "sample_id": sample_ids,
            "grad_norm": pa.nulls(n, pa.float32()),
            **{k: pa.array(v, from_pandas=True) for k, v in combined.items()},
        }
    )
    return table.select(SCORES.names).cast(SCORES)


@torch.no_grad()
def _eval_logits(proxy: Proxy, idx: np.ndarray) -> tuple[Tensor, Tensor]:
    return proxy.logits(idx)


def checkpoint_scores(
    proxies: list[Proxy], lrs: list[float], score_index: int, batch_size: int, gradients: bool = True
) -> dict[str, np.ndarray]:
    """Scores that need the checkpoints of one seed (proxies in checkpoint order, lrs their step sizes):

    el2n, grand at checkpoint ``score_index``; vog (raw) and self_influence over all checkpoints;
    loss at the last checkpoint. [N] each. Without ``gradients`` only the forward scores (el2n, loss)
    are computed; grand, vog and self_influence are NaN."""
    n = len(proxies[0])
    out = {k: np.zeros(n) if gradients else np.full(n, np.nan) for k in ("grand", "vog", "self_influence")}
    out |= {k: np.zeros(n) for k in ("el2n", "loss")}
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        logits, labels = _eval_logits(proxies[score_index], idx)
        last_logits = logits if score_index == len(proxies) - 1 else _eval_logits(proxies[-1], idx)[0]
        out["el2n"][idx] = dyn.visit_stats(logits, labels, proxies[0].task)["el2n"].numpy()
        out["loss"][idx] = per_sample_loss(last_logits, labels, proxies[0].task).numpy()
        if gradients:
            norms = torch.stack([p.grad_norms(idx) for p in proxies])  # [K, B]
            input_grads = [p.input_grads(idx) for p in proxies]
            out["grand"][idx] = norms[score_index].numpy()
            out["self_influence"][idx] = dyn.tracin_self_influence(lrs, norms.numpy())
            out["vog"][idx] = dyn.vog([g for g, _ in input_grads], input_grads[0][1]).numpy()
    return out


@torch.no_grad()
def evaluate(proxy: Proxy, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean loss) of a trained proxy on its own samples (build it on held-out data)."""
    n, correct, loss = len(proxy), 0.0, 0.0
    for start in range(0, n, batch_size):
        logits, labels = proxy.logits(np.arange(start, min(start + batch_size, n)))
        stats = dyn.visit_stats(logits, labels, proxy.task)
        correct += float(stats["correct"].sum())
        loss += float(stats["loss"].sum())
    return correct / n, loss / n
