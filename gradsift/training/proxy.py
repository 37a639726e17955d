"""Proxies and their data (pure torch; no prefect or ray).

Two modes behind one small interface (``Proxy``): ``HFProxy`` trains a Hugging Face model (all weights or
LoRA adapters; sequence classifier or causal LM), ``HeadProxy`` trains a head on frozen, pre-computed
embeddings. ``TrainData`` holds the rows, their class ids and (frozen mode) their embeddings; AUM threshold
samples are relabelled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from gradsift.data.batching import Encoded, collate
from gradsift.engine.gradients import PerSampleGradients
from gradsift.models.adapter import TaskType, adapter, forward_logits, per_sample_loss
from gradsift.models.checkpoints import (
    CheckpointInfo,
    load_checkpoint_model,
)
from gradsift.models.embeddings import build_head
from gradsift.models.loading import load_model
from gradsift.schemas.engine import EngineConfig
from gradsift.schemas.train import TrainConfig
from gradsift.signals import dynamics as dyn


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
        types = {} if batch.token_type_ids is None else {"token_type_ids": batch.token_type_ids}
        logits = self.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, **types).logits
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
    return HFProxy(model, tokenizer, task, encode_rows(cfg, data, tokenizer, task), cfg.lora)


def encode_rows(cfg: TrainConfig, data: TrainData, tokenizer, task: TaskType) -> list[Encoded]:
    """The samples' tokens and targets, cut to ``cfg.max_length``."""
    items = [adapter(task).encode(r, tokenizer, data.label_index) for r in data.rows]
    n = cfg.max_length
    return [
        Encoded(
            it.dataset,
            it.sample_id,
            it.input_ids[:n],
            it.target if isinstance(it.target, int) else it.target[:n],
            None if it.token_type_ids is None else it.token_type_ids[:n],
        )
        for it in items
    ]


def rebind(proxy: Proxy, cfg: TrainConfig, data: TrainData) -> Proxy:
    """The same trained model over other samples (e.g. held-out data for ``evaluate``)."""
    if isinstance(proxy, HeadProxy):
        return HeadProxy(proxy.model, data.embeddings, data.labels)
    items = encode_rows(cfg, data, proxy.tokenizer, proxy.task)
    return HFProxy(proxy.model, proxy.tokenizer, proxy.task, items, proxy.lora)


def embed_cache_dir(cfg: TrainConfig) -> str:
    """Where frozen-mode embeddings are cached: ``cfg.embed_cache`` or ``<store>/embeddings``."""
    return cfg.embed_cache or str(Path(cfg.store) / "embeddings")


def load_train_data(cfg: TrainConfig, base_model: str, rows: list[dict], label_index: dict | None) -> TrainData:
    """Rows plus, in frozen mode, their cached embeddings (computed once per text and encoder)."""
    if cfg.mode != "frozen":
        return TrainData(rows, label_index)
    from gradsift.models.embeddings import cached_embeddings

    texts, pairs = [r["text"] for r in rows], [r.get("text_pair") for r in rows]
    emb = cached_embeddings(embed_cache_dir(cfg), base_model, texts, cfg.max_length, pairs=pairs)
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
