"""Sample identity for in-run capture: a collator that carries each batch's sample ids to the capture hooks.

The ids travel in the batch under ``ID_KEY`` (a list of (dataset, sample_id)); the capture hooks pop them from
the model call's keyword arguments before the model sees them, so any collator and model work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

ID_KEY = "gradsift_sample_ids"


class MissingSampleIdsError(ValueError):
    """A training batch reached the model without sample ids."""


MISSING_HINT = (
    "wrap the data collator in gradsift.capture.SampleIdCollator and keep an id column in the dataset "
    "(with the HF Trainer also set TrainingArguments(remove_unused_columns=False), which otherwise drops it)"
)


class SampleIdCollator:
    """Wraps ``collator`` (default: transformers' padding collator for ``tokenizer``): takes ``id_column`` (and
    ``dataset_column`` when present, else ``dataset``) out of each feature and adds them as ``ID_KEY``."""

    def __init__(
        self,
        collator: Callable | None = None,
        tokenizer=None,
        id_column: str = "sample_id",
        dataset_column: str = "dataset",
        dataset: str = "data",
    ):
        if collator is None:
            from transformers import DataCollatorWithPadding, default_data_collator

            collator = DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator
        self.collator, self.id_column, self.dataset_column, self.dataset = collator, id_column, dataset_column, dataset

    def __call__(self, features: list[dict]) -> dict:
        missing = [i for i, f in enumerate(features) if self.id_column not in f]
        if missing:
            keys = sorted(features[missing[0]])
            raise MissingSampleIdsError(
                f"{len(missing)} of {len(features)} features have no {self.id_column!r} column (they have {keys}): "
                + MISSING_HINT
            )
        ids = [(str(f.get(self.dataset_column, self.dataset)), str(f[self.id_column])) for f in features]
        drop = {self.id_column, self.dataset_column}
        batch = self.collator([{k: v for k, v in f.items() if k not in drop} for f in features])
        batch[ID_KEY] = ids
        return batch


def with_sample_ids(dataset, id_column: str = "sample_id"):
    """A ``datasets.Dataset`` with an ``id_column`` (its row index as a string) when it has none."""
    if id_column in dataset.column_names:
        return dataset
    return dataset.add_column(id_column, [str(i) for i in range(len(dataset))])


def samples_dataset(
    rows: list[dict], tokenizer, label_index: dict[str, int] | None, max_length: int = 128
) -> list[dict]:
    """gradsift's ingested samples (``samples`` rows) as features a Trainer trains on (a map-style dataset): input_ids,
    attention_mask, labels (class id, or causal targets), dataset and sample_id (the ingest content hash)."""
    from gradsift.models.adapter import adapter

    task = "classification" if label_index else "causal_lm"
    out = []
    for row in rows:
        enc = adapter(task).encode(row, tokenizer, label_index)
        ids = enc.input_ids[:max_length]
        target = enc.target if isinstance(enc.target, int) else enc.target[:max_length]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": target, "dataset": enc.dataset,
                    "sample_id": enc.sample_id})  # fmt: skip
    return out
