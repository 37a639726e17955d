"""The per-sample loss of each task type, written once (STYLE: Kronfluence's ``Task``): how a batch
becomes per-sample losses for causal LMs and sequence classifiers. Everything else is generic.
No prefect or ray imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TaskType = Literal["causal_lm", "classification"]
IGNORE_INDEX = -100


@dataclass
class Batch:
    """A padded micro-batch.

    input_ids, attention_mask: [B, T]. labels: [B, T] token targets for causal LMs (IGNORE_INDEX on
    prompt and pad positions; position t is predicted from tokens < t), or [B] class ids.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def per_sample_loss(logits: Tensor, labels: Tensor, task: TaskType, reduction: str = "mean") -> Tensor:
    """Per-sample cross-entropy, float32, shape [B].

    causal_lm: mean over the sample's target tokens (response tokens when there is a prompt), or their
    sum with ``reduction="sum"`` (the negative log-probability of the response); classification:
    cross-entropy of the class logits.
    """
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    b, t, v = logits.shape
    shifted = torch.full_like(labels, IGNORE_INDEX)  # position t predicts token t + 1
    shifted[:, :-1] = labels[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(b * t, v).float(), shifted.reshape(-1), reduction="none").view(b, t)
    total = token_loss.sum(dim=1)
    if reduction == "sum":
        return total
    return total / (shifted != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits of a Hugging Face causal LM ([B, T, V]) or sequence classifier ([B, C])."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def task_of(model: nn.Module) -> TaskType:
    """Classify a loaded model by its Hugging Face head."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith(("ForCausalLM", "LMHeadModel")):  # GPT2LMHeadModel is a causal LM too
        return "causal_lm"
    raise ValueError(f"unsupported model class {name}: use a causal LM or a sequence classifier")
