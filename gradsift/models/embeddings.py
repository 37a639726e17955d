"""Frozen-encoder embeddings: mean-pooled encoder outputs, computed once and cached as Parquet.

The cache folder holds ``<model digest>/<text digest>.parquet`` (one float32 vector per text, in
order); a text seen before with the same model is never embedded again. No prefect or ray imports.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gradsift.models.folders import SAFE_LOAD, check_model_folder
from gradsift.storage.atomic import write_parquet_atomic


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors over real (mask 1) positions: [B, T, H], [B, T] -> [B, H]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@torch.no_grad()
def embed_texts(
    encoder_path: str,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
    on_batch: Callable[[int], None] | None = None,
    pairs: Sequence[str | None] | None = None,
) -> np.ndarray:
    """Mean-pooled last hidden states of a local Hugging Face encoder, float32 [N, H]; with ``pairs``, text i
    and pairs[i] (when not None) are encoded jointly as a sentence pair (token type ids for BERT)."""
    from transformers import AutoModel, AutoTokenizer

    path = check_model_folder(encoder_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model = AutoModel.from_pretrained(path, **SAFE_LOAD).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        second = [pairs[i] for i in idx] if pairs is not None else []
        if second and not all(p is None for p in second):
            firsts = [texts[i] for i in idx]
            rows = [_encode_one(tokenizer, t, p, max_length) for t, p in zip(firsts, second, strict=True)]
            enc = tokenizer.pad(rows, return_tensors="pt")
        else:
            enc = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        hidden = model(**enc).last_hidden_state
        out[idx] = mean_pool(hidden, enc["attention_mask"]).numpy()
        if on_batch:
            on_batch(len(idx))
    return out


def _encode_one(tokenizer, text: str, pair: str | None, max_length: int) -> dict:
    """One text, or one sentence pair, tokenized (cut to ``max_length``, the longer side first)."""
    return tokenizer(text, pair, truncation="longest_first" if pair is not None else True, max_length=max_length)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_embeddings(
    cache_dir: str | Path,
    encoder_path: str,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    pairs: Sequence[str | None] | None = None,
) -> np.ndarray:
    """``embed_texts`` (sentence pairs jointly, with ``pairs``) through a Parquet cache: ``<cache>/<encoder digest>/<part>.parquet`` rows of
    (text key, embedding); only texts missing from the cache are embedded (then added as a new part).
    ``progress(done, total)`` follows the texts being embedded."""
    folder = Path(cache_dir).expanduser() / _digest(str(Path(encoder_path).resolve()), str(max_length))
    second = list(pairs) if pairs is not None else [None] * len(texts)
    keys = [_digest(t) if p is None else _digest(t, p) for t, p in zip(texts, second, strict=True)]
    by_key = {k: (t, p) for k, t, p in zip(keys, texts, second, strict=True)}
    known: dict[str, np.ndarray] = {}
    for part in sorted(folder.glob("*.parquet")):
        table = pq.read_table(part)
        column = table.column("embedding").combine_chunks()
        vectors = column.values.to_numpy().reshape(len(column), -1)
        known.update(zip(table.column("key").to_pylist(), vectors, strict=True))
    missing = sorted((k, tp) for k, tp in by_key.items() if k not in known)
    if missing:
        done = 0

        def on_batch(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, len(missing))

        firsts, seconds = [tp[0] for _, tp in missing], [tp[1] for _, tp in missing]
        emb = embed_texts(encoder_path, firsts, batch_size, max_length, on_batch, seconds)
        flat = pa.array(emb.reshape(-1), type=pa.float32())
        table = pa.table(
            {"key": [k for k, _ in missing], "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])}
        )
        write_parquet_atomic(table, folder / f"{_digest(*(k for k, _ in missing))}.parquet", row_group_size=4096)
        known.update(zip(table.column("key").to_pylist(), emb, strict=True))
    return np.stack([known[k] for k in keys]).astype(np.float32)


def build_head(input_dim: int, num_labels: int, hidden: int = 0, seed: int = 0) -> torch.nn.Module:
    """The trained part in frozen-encoder mode: a linear head, or one hidden ReLU layer when ``hidden`` > 0."""
    torch.manual_seed(seed)
    if hidden == 0:
        return torch.nn.Linear(input_dim, num_labels)
    return torch.nn.Sequential(torch.nn.Linear(input_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_labels))
