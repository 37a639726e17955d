"""The proxy-training loop, per-sample dynamics and checkpoint scores (pure torch; no prefect or ray).

Two modes behind one small interface (``Proxy``): ``HFProxy`` trains a Hugging Face model (all
weights or LoRA adapters; sequence classifier or causal LM), ``HeadProxy`` trains a head on frozen,
pre-computed embeddings. ``train`` runs AdamW with a per-step learning rate, logs every sample visit
(loss, pred, correct, margin, EL2N), checkpoints after each epoch and resumes from the last one.
``checkpoint_scores`` and ``visit_scores`` turn checkpoints and visits into the score columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from gradsift.data.batching import Encoded, collate
from gradsift.engine.gradients import PerSampleGradients
from gradsift.models.adapter import TaskType, adapter, forward_logits, per_sample_loss
from gradsift.models.checkpoints import (
    CheckpointInfo,
    list_checkpoints,
    load_checkpoint_model,
    load_optimizer_state,
    save_checkpoint,
)
from gradsift.models.embeddings import build_head
from gradsift.models.loading import load_model
from gradsift.schemas.engine import EngineConfig
from gradsift.schemas.tables import DYNAMICS
from gradsift.schemas.train import Budget, TrainConfig
from gradsift.signals import dynamics as dyn
from gradsift.storage.store import Store


class HeadProxy:
    """A head trained on frozen embeddings X [N, H] with class ids y [N]."""

    task: TaskType = "classification"

    def __init__(self, model: nn.Module, x: np.ndarray, y: np.ndarray):
        self.model, self.tokenizer = model, None
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y).long()

    def __len__(self) -> int:
        return len(self.y)

    def logits(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        return self.model(self.x[idx]), self.y[idx]

    def input_grads(self, idx: np.ndarray) -> tuple[Tensor, None]:
        """d gold logit / d embedding, [B, H] (the head's input is the embedding-layer output here)."""
        x = self.x[idx].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.model(x).gather(1, self.y[idx][:, None]).sum(), x)
        return grad, None

    def grad_norms(self, idx: np.ndarray) -> Tensor:
        """|| grad_w loss_i ||_2 of each sample (torch.func per-sample gradients of the small head)."""
        from torch.func import functional_call, grad, vmap

        params = {k: v.detach() for k, v in self.model.named_parameters()}

        def loss(p, x, y):
            return per_sample_loss(functional_call(self.model, p, (x[None],)), y[None], "classification")[0]

        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, self.x[idx], self.y[idx])
        return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


class HFProxy:
    """A Hugging Face model trained on tokenised samples (classifier or causal LM, full or LoRA)."""

    def __init__(self, model: nn.Module, tokenizer, task: TaskType, items: list[Encoded], lora: bool):
        self.model, self.tokenizer, self.task, self.items, self.lora = model, tokenizer, task, items, lora
        self._engine: PerSampleGradients | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _batch(self, idx: np.ndarray):
        return collate([self.items[i] for i in idx], self.tokenizer.pad_token_id)

    def logits(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        batch = self._batch(idx)
        return forward_logits(self.model, batch), batch.labels

    def input_grads(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """d gold logit / d embedding-layer output, [B, T, H], with the attention mask [B, T]."""
        batch = self._batch(idx)
        embeds = self.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
        logits = self.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        (grad,) = torch.autograd.grad(dyn.gold_logit(logits, batch.labels, self.task).sum(), embeds)
        return grad, batch.attention_mask

    def grad_norms(self, idx: np.ndarray) -> Tensor:
        """|| grad_w loss_i ||_2 over the trained parameters, from the per-sample gradient engine."""
        if self._engine is None:
            config = EngineConfig(parameters="lora" if self.lora else "all", layer_stats=False, feature_dim=0)
            self._engine = PerSampleGradients(self.model, config)
        return self._engine.compute(self._batch(idx)).grad_norm


Proxy = HeadProxy | HFProxy


@dataclass
class TrainData:
    """What a proxy is built from: sample rows (dataset, sample_id, label, text...), their class ids."""

    rows: list[dict]
    label_index: dict[str, int] | None
    embeddings: np.ndarray | None = None  # frozen mode

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.label_index[r["label"]] for r in self.rows]) if self.label_index else None

    def subset(self, keep: np.ndarray) -> TrainData:
        """The samples where ``keep`` (bool [N]) is true."""
        rows = [r for r, k in zip(self.rows, keep, strict=True) if k]
        return TrainData(rows, self.label_index, None if self.embeddings is None else self.embeddings[keep])


def build_proxy(cfg: TrainConfig, base_model: str, data: TrainData, seed: int, info: CheckpointInfo | None) -> Proxy:
    """A fresh proxy (seeded head or model) or one restored from checkpoint ``info``."""
    num_labels = len(data.label_index) if data.label_index else None
    if cfg.mode == "frozen":
        model = (
            load_checkpoint_model(info)[0]
            if info
            else build_head(data.embeddings.shape[1], num_labels, cfg.head_hidden, seed=seed)
        )
        return HeadProxy(model, data.embeddings, data.labels)
    if info:
        model, tokenizer = load_checkpoint_model(info)
    else:
        model, tokenizer = load_model(base_model, num_labels, seed=seed)
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            task_type = "SEQ_CLS" if num_labels else "CAUSAL_LM"
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, task_type=task_type))
    task: TaskType = "classification" if num_labels else "causal_lm"
    return HFProxy(model, tokenizer, task, _encode(cfg, data, tokenizer, task), cfg.lora)


def _encode(cfg: TrainConfig, data: TrainData, tokenizer, task: TaskType) -> list[Encoded]:
    """The samples' tokens and targets, cut to ``cfg.max_length``."""
    items = [adapter(task).encode(r, tokenizer, data.label_index) for r in data.rows]
    n = cfg.max_length
    return [
        Encoded(it.dataset, it.sample_id, it.input_ids[:n], it.target if isinstance(it.target, int) else it.target[:n])
        for it in items
    ]


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


def _say(line: str) -> None:
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


def rebind(proxy: Proxy, cfg: TrainConfig, data: TrainData) -> Proxy:
    """The same trained model over other samples (e.g. held-out data for ``evaluate``)."""
    if isinstance(proxy, HeadProxy):
        return HeadProxy(proxy.model, data.embeddings, data.labels)
    items = _encode(cfg, data, proxy.tokenizer, proxy.task)
    return HFProxy(proxy.model, proxy.tokenizer, proxy.task, items, proxy.lora)


def embed_cache_dir(cfg: TrainConfig) -> str:
    """Where frozen-mode embeddings are cached: ``cfg.embed_cache`` or ``<store>/embeddings``."""
    return cfg.embed_cache or str(Path(cfg.store) / "embeddings")


def load_train_data(cfg: TrainConfig, base_model: str, rows: list[dict], label_index: dict | None) -> TrainData:
    """Rows plus, in frozen mode, their cached embeddings (computed once per text and encoder)."""
    if cfg.mode != "frozen":
        return TrainData(rows, label_index)
    from gradsift.models.embeddings import cached_embeddings

    emb = cached_embeddings(embed_cache_dir(cfg), base_model, [r["text"] for r in rows], max_length=cfg.max_length)
    return TrainData(rows, label_index, emb)


THRESHOLD_LABEL = "__threshold__"


def threshold_samples(rows: list[dict], label_index: dict, seed: int) -> tuple[list[dict], dict, np.ndarray]:
    """Pleiss et al. 2020 threshold samples: N/(C+1) samples (chosen with ``seed``) are relabelled to a
    fake extra class, mislabelled by construction; returns (rows, label index with that class, mask)."""
    n, c = len(rows), len(label_index)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 7]).choice(n, n // (c + 1), replace=False)] = True
    rows = [{**r, "label": THRESHOLD_LABEL} if m else r for r, m in zip(rows, mask, strict=True)]
    return rows, {**label_index, THRESHOLD_LABEL: c}, mask


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
            say=_say,
        )
        proxies = [build_proxy(cfg, base_model, data, seed, info) for info in infos]
        what = "gradient and forward scores" if cfg.gradient_scores else "forward scores only"
        _say(f"{train_run_id}: scoring {len(ids)} samples at {len(infos)} checkpoints ({what})")
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
        _say(
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
