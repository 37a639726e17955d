"""Samples -> token ids and targets -> padded micro-batches (no prefect or ray)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradsift.models.adapter import IGNORE_INDEX, Batch, TaskType


@dataclass
class Encoded:
    """One tokenised sample: ids and per-token targets (causal LM) or a class id."""

    dataset: str
    sample_id: str
    input_ids: list[int]
    target: list[int] | int


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


def count_tokens(tokenizer, task: TaskType, prompt: str | None, response: str | None, text: str) -> int:
    """The length a sample will have when scored (ingest quarantines what is over the limit)."""
    if task == "classification":
        return len(tokenizer(text)["input_ids"])
    return len(encode_causal(tokenizer, prompt, response, text)[0])


def encode_row(row: dict, tokenizer, task: TaskType, label_index: dict[str, int] | None) -> Encoded:
    if task == "classification":
        if not label_index or row["label"] not in label_index:
            raise ValueError(
                f"sample {row['sample_id']} has label {row['label']!r}, not one of {sorted(label_index or {})}"
            )
        return Encoded(row["dataset"], row["sample_id"], tokenizer(row["text"])["input_ids"], label_index[row["label"]])
    ids, targets = encode_causal(tokenizer, row["prompt"], row["response"], row["text"])
    return Encoded(row["dataset"], row["sample_id"], ids, targets)


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
    return Batch(ids, mask, labels)


def micro_batches(items: list[Encoded], size: int) -> list[list[Encoded]]:
    """Length-sorted micro-batches (less padding); results do not depend on the grouping."""
    ordered = sorted(items, key=lambda it: len(it.input_ids))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
