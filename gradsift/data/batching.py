"""Samples -> token ids and targets -> padded micro-batches (no prefect or ray)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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
    token_type_ids: Tensor | None = None  # [B, T] segment ids of sentence pairs (BERT), else None

    def to(self, device: torch.device | str) -> Batch:
        types = None if self.token_type_ids is None else self.token_type_ids.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), types)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Encoded:
    """One tokenised sample: ids and per-token targets (causal LM) or a class id."""

    dataset: str
    sample_id: str
    input_ids: list[int]
    target: list[int] | int
    token_type_ids: list[int] | None = None  # a sentence pair's segment ids


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """([bos], [eos]) of the tokenizer, each empty when it has none."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """BOS + the prompt's tokens: the head of a prompt/response sample (no loss on it)."""
    return special_ids(tokenizer)[0] + _ids(tokenizer, prompt)


def response_ids(tokenizer, response: str) -> list[int]:
    """The response's tokens + EOS: the tail of a prompt/response sample (its targets)."""
    return _ids(tokenizer, response) + special_ids(tokenizer)[1]


def encode_causal(tokenizer, prompt: str | None, response: str | None, text: str | None) -> tuple[list[int], list[int]]:
    """Token ids and targets: loss on response tokens when there is a prompt, else on every token."""
    bos, eos = special_ids(tokenizer)
    if prompt is not None:
        head, tail = prompt_ids(tokenizer, prompt), response_ids(tokenizer, response or "")
        return head + tail, [IGNORE_INDEX] * len(head) + tail
    ids = bos + _ids(tokenizer, text or "") + eos
    return ids, [IGNORE_INDEX] * len(bos) + ids[len(bos) :]


def collate(items: list[Encoded], pad_id: int) -> Batch:
    """Right-padded batch; pad positions have attention 0 and no targets."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    token_targets = not isinstance(items[0].target, int)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long) if token_targets else None
    for i, it in enumerate(items):
        n = len(it.input_ids)
        ids[i, :n] = torch.tensor(it.input_ids)
        mask[i, :n] = 1
        if token_targets:
            labels[i, :n] = torch.tensor(it.target)
    if not token_targets:
        labels = torch.tensor([it.target for it in items], dtype=torch.long)
    types = None
    if any(it.token_type_ids is not None for it in items):
        types = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            if it.token_type_ids is not None:
                types[i, : len(it.token_type_ids)] = torch.tensor(it.token_type_ids)
    return Batch(ids, mask, labels, types)


def micro_batches(items: list[Encoded], size: int) -> list[list[Encoded]]:
    """Length-sorted micro-batches (less padding); results do not depend on the grouping."""
    ordered = sorted(items, key=lambda it: len(it.input_ids))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
