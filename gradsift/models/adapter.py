"""The per-sample loss of each task type, written once (STYLE: Kronfluence's ``Task``): how a batch
becomes per-sample losses for causal LMs and sequence classifiers. Everything else is generic.
No prefect or ray imports.
"""

from __future__ import annotations

import copy
import weakref
from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsift.data.batching import IGNORE_INDEX, Batch, Encoded, encode_causal, special_ids

TaskType = Literal["causal_lm", "classification"]

_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_lengths(tokenizer, inputs: list[str | tuple[str, str]], add_special_tokens: bool = True) -> list[int]:
    """``len(tokenizer(x, add_special_tokens=...)["input_ids"])`` of each text or (text, pair), in one call.

    A fast tokenizer's Rust backend is called directly (a copy without the truncation and padding that a
    ``tokenizer.json`` may carry: the wrapper's call without arguments has neither): the wrapper's per-call setup and
    its conversion of every encoding to Python lists (attention mask, token type ids) are skipped (MiniLM, 30k short
    rows, CPU time: 15,300 rows/s one row per wrapper call, 24,000 in wrapper calls of 256, 27,000 from the backend;
    bench/RESULTS.md). Other tokenizers go through their own call."""
    if not inputs:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [len(tokenizer(*x if isinstance(x, tuple) else (x,), add_special_tokens=add_special_tokens)["input_ids"])
                for x in inputs]  # fmt: skip
    if (backend := _BACKENDS.get(tokenizer)) is None:
        backend = _BACKENDS[tokenizer] = copy.deepcopy(tokenizer.backend_tokenizer)
        backend.no_truncation()
        backend.no_padding()
    return [len(e.ids) for e in backend.encode_batch(inputs, add_special_tokens=add_special_tokens)]


class ModelAdapter(ABC):
    """How one kind of model turns samples into a batch and logits into per-sample losses."""

    task: TaskType

    @abstractmethod
    def count_tokens(
        self, tokenizer, prompt: str | None, response: str | None, text: str, text_pair: str | None = None
    ) -> int:
        """The length a sample will have when scored (ingest quarantines what is over the limit)."""

    def count_tokens_batch(self, tokenizer, rows: list[tuple]) -> list[int]:
        """``count_tokens`` of each (prompt, response, text[, text_pair]) row, in one tokenizer call where the task allows;
        the same counts. Raises when any row fails (ingest then counts that batch row by row)."""
        return [self.count_tokens(tokenizer, *row) for row in rows]

    @abstractmethod
    def encode(self, row: dict, tokenizer, label_index: dict[str, int] | None) -> Encoded:
        """One sample row (``samples`` table) as token ids and targets."""

    @abstractmethod
    def loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Per-sample cross-entropy, float32, shape [B]."""

    @abstractmethod
    def token_view(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits [M, C], labels [M], owner [M]): one row per class decision (a sample, or a target token)."""


class CausalLMAdapter(ModelAdapter):
    """Next-token loss on the target tokens: the response when there is a prompt (pairs too), else every token."""

    task = "causal_lm"

    def count_tokens(self, tokenizer, prompt, response, text, text_pair=None) -> int:
        if text_pair is not None:
            raise ValueError("a causal LM takes no sentence pairs: map the pair to prompt and response instead")
        return len(encode_causal(tokenizer, prompt, response, text)[0])

    def count_tokens_batch(self, tokenizer, rows) -> list[int]:
        """BOS + prompt + response + EOS, or BOS + text + EOS (``encode_causal``), each part tokenized in one call."""
        bos, eos = special_ids(tokenizer)
        if any(len(row) > 3 for row in rows):
            raise ValueError("a causal LM takes no sentence pairs: map the pair to prompt and response instead")
        parts = [part for p, r, t in rows for part in ((p, r or "") if p is not None else (t or "",))]
        lengths = iter(token_lengths(tokenizer, parts, add_special_tokens=False))
        return [len(bos) + next(lengths) + (next(lengths) if p is not None else 0) + len(eos) for p, _, _ in rows]

    def encode(self, row, tokenizer, label_index) -> Encoded:
        ids, targets = encode_causal(tokenizer, row["prompt"], row["response"], row["text"])
        return Encoded(row["dataset"], row["sample_id"], ids, targets)

    def loss(self, logits, labels, reduction="mean") -> Tensor:
        """Mean over the sample's target tokens, or their sum with ``reduction="sum"`` (the negative
        log-probability of the response)."""
        b, t, v = logits.shape
        shifted = torch.full_like(labels, IGNORE_INDEX)  # position t predicts token t + 1
        shifted[:, :-1] = labels[:, 1:]
        token_loss = F.cross_entropy(logits.reshape(b * t, v).float(), shifted.reshape(-1), reduction="none")
        total = token_loss.view(b, t).sum(dim=1)
        if reduction == "sum":
            return total
        return total / (shifted != IGNORE_INDEX).sum(dim=1).clamp(min=1)

    def token_view(self, logits, labels):
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        keep = labels != IGNORE_INDEX
        owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        if bool(keep.all()):  # no ignored token: a reshape copies less than a masked gather
            return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), owner.reshape(-1)
        return logits[keep], labels[keep], owner[keep]


class ClassifierAdapter(ModelAdapter):
    """Cross-entropy of a sequence classifier's class logits; the label set is fixed at ingest."""

    task = "classification"

    def count_tokens(self, tokenizer, prompt, response, text, text_pair=None) -> int:
        return len(tokenizer(text, text_pair)["input_ids"])

    def count_tokens_batch(self, tokenizer, rows) -> list[int]:
        """One call for the batch, single texts and sentence pairs together (``token_lengths``)."""
        return token_lengths(
            tokenizer, [row[2] if len(row) < 4 or row[3] is None else (row[2], row[3]) for row in rows]
        )

    def encode(self, row, tokenizer, label_index) -> Encoded:
        if not label_index or row["label"] not in label_index:
            raise ValueError(
                f"sample {row['sample_id']} has label {row['label']!r}, not one of {sorted(label_index or {})}"
            )
        enc = tokenizer(row["text"], row.get("text_pair"))
        pair = row.get("text_pair") is not None and "token_type_ids" in enc
        types = enc["token_type_ids"] if pair else None
        return Encoded(row["dataset"], row["sample_id"], enc["input_ids"], label_index[row["label"]], types)

    def loss(self, logits, labels, reduction="mean") -> Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def token_view(self, logits, labels):
        return logits.float(), labels, torch.arange(labels.shape[0], device=labels.device)


ADAPTERS: dict[TaskType, ModelAdapter] = {a.task: a for a in (CausalLMAdapter(), ClassifierAdapter())}


def adapter(task: TaskType) -> ModelAdapter:
    return ADAPTERS[task]


def per_sample_loss(logits: Tensor, labels: Tensor, task: TaskType, reduction: str = "mean") -> Tensor:
    """Per-sample cross-entropy of ``task``'s adapter, float32, shape [B]."""
    return adapter(task).loss(logits, labels, reduction)


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits of a Hugging Face causal LM ([B, T, V]) or sequence classifier ([B, C])."""
    types = {} if batch.token_type_ids is None else {"token_type_ids": batch.token_type_ids}
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **types).logits


def task_of(model: nn.Module) -> TaskType:
    """Classify a loaded model by its Hugging Face head."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith(("ForCausalLM", "LMHeadModel")):  # GPT2LMHeadModel is a causal LM too
        return "causal_lm"
    raise ValueError(f"unsupported model class {name}: use a causal LM or a sequence classifier")
