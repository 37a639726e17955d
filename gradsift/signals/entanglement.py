"""Gradient entanglement of preference pairs (no prefect or ray).

Yuan et al., ICLR 2025, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement", section 3: with g_w = grad log pi(y_w | x) and g_l = grad log pi(y_l | x) (summed
response log-probabilities), a margin loss raises the chosen log-prob and lowers the rejected one at
once only while <g_w, g_l> is small against both squared norms; the condition is read from

    condition_ratio = <g_w, g_l> / min(||g_w||^2, ||g_l||^2)

(both log-probs move in the same direction when it exceeds 1). Per pair we report the dot product, the
cosine, both norms and the ratio. Norms come from the engine exactly; the dot product from materialised
gradients (exact) or from projected features (an unbiased estimate, for models too big to materialise).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import torch

from gradsift.data.batching import IGNORE_INDEX, Encoded, collate, prompt_ids, response_ids, special_ids
from gradsift.data.reasons import Problem, quarantine_row
from gradsift.schemas.tables import PAIR_SCORES


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """Content hash of a pair (its id in ``pair_scores``)."""
    return hashlib.sha256("\x1f".join((prompt, chosen, rejected)).encode()).hexdigest()[:16]


def truncate_pair(head: list[int], tails: list[list[int]], max_tokens: int, n_bos: int) -> tuple[list[int], int, bool]:
    """How a pair fits in ``max_tokens``: (prompt tokens kept, response tokens kept, truncated?).

    ``head`` is BOS + prompt tokens, ``tails`` the responses' tokens + EOS. When the head and the
    longer tail fit, nothing is cut. Otherwise the prompt keeps its END, ``k = max(max_tokens - longest
    tail, max_tokens // 2)`` tokens (all of it when shorter; BOS stays first), and every response its
    START, ``max_tokens - k`` tokens: a short response stays whole and the prompt gives way, a long one
    is cut and the prompt still keeps at least half the budget. Both responses see the same prompt tokens.
    """
    longest = max(len(t) for t in tails)
    if len(head) + longest <= max_tokens:
        return head, longest, False
    k = min(len(head), max(max_tokens - longest, max_tokens // 2))
    kept = head if len(head) <= k else head[:n_bos] + head[len(head) - (k - n_bos) :]
    return kept, max_tokens - len(kept), True


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_tokens: int) -> tuple[Encoded, Encoded, bool]:
    """(chosen, rejected) samples, targets on the response tokens only, cut to ``max_tokens`` by the rule
    of ``truncate_pair`` (prompt end and response start kept); the flag says whether anything was cut."""
    head = prompt_ids(tokenizer, prompt)
    tails = [response_ids(tokenizer, chosen), response_ids(tokenizer, rejected)]
    if not all(tails):
        raise ValueError("a response has no tokens")
    kept, n_tail, cut = truncate_pair(head, tails, max_tokens, len(special_ids(tokenizer)[0]))
    targets = [IGNORE_INDEX] * len(kept)
    w, r = (
        Encoded("pairs", key, kept + t[:n_tail], targets + t[:n_tail]) for key, t in (("w", tails[0]), ("l", tails[1]))
    )
    return w, r, cut


def entanglement(g_w: np.ndarray, g_l: np.ndarray, norm_w: np.ndarray, norm_l: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair dot, cosine, norms and condition ratio from gradient rows [B, P] (or projected [B, k])
    and exact norms [B] (Yuan et al. 2025, section 3)."""
    dot = np.einsum("ij,ij->i", np.asarray(g_w, np.float64), np.asarray(g_l, np.float64))
    nw, nl = np.asarray(norm_w, np.float64), np.asarray(norm_l, np.float64)
    return {
        "dot": dot,
        "cosine": dot / np.maximum(nw * nl, 1e-30),
        "norm_chosen": nw,
        "norm_rejected": nl,
        "condition_ratio": dot / np.maximum(np.minimum(nw**2, nl**2), 1e-30),
    }


def pair_batch(engine, tokenizer, pairs: list[tuple[str, str, str]], max_tokens: int, exact: bool) -> dict:
    """Entanglement of ``pairs`` (prompt, chosen, rejected) with ``engine`` (loss_reduction "sum", so each
    per-sample loss is minus the summed response log-prob; the sign cancels in every reported quantity).
    Too-long pairs are cut as ``encode_pair`` says; ``truncated`` flags them."""
    if engine.config.loss_reduction != "sum":
        raise ValueError("entanglement needs gradients of summed log-probs: EngineConfig(loss_reduction='sum')")
    dev = next(engine.model.parameters()).device
    items, cut = [], []
    for prompt, chosen, rejected in pairs:
        *both, c = encode_pair(tokenizer, prompt, chosen, rejected, max_tokens)
        items += both
        cut.append(c)
    out = engine.compute(collate(items, tokenizer.pad_token_id).to(dev), flat_grads=exact)
    vec = out.flat if exact else out.features
    if vec is None:
        raise ValueError("exact=False needs projected features: set a feature_dim > 0")
    vec, norm, loss = vec.numpy(), out.grad_norm.numpy(), out.loss.numpy()
    res = entanglement(vec[0::2], vec[1::2], norm[0::2], norm[1::2])
    res["logp_chosen"], res["logp_rejected"] = -loss[0::2].astype(np.float64), -loss[1::2].astype(np.float64)
    res["truncated"] = np.array(cut, dtype=bool)
    return res


def score_pairs(
    engine, tokenizer, rows: list[tuple[int, str, str, str]], dataset: str, source: str, max_tokens: int, exact: bool
) -> tuple[pa.Table, list[dict]]:
    """``pair_scores`` rows of ``rows`` (line, prompt, chosen, rejected), in micro-batches of the engine's size
    (two samples a pair), and quarantine rows of the pairs that have no response tokens."""
    usable, bad = [], []
    for line, prompt, chosen, rejected in rows:
        try:
            encode_pair(tokenizer, prompt, chosen, rejected, max_tokens)
            usable.append((line, prompt, chosen, rejected))
        except ValueError as err:
            raw = json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False)
            bad.append(quarantine_row(dataset, source, line, Problem("empty_text", str(err)), raw))
    out = []
    step = max(1, engine.config.micro_batch_size // 2)
    for i in range(0, len(usable), step):
        chunk = usable[i : i + step]
        res = pair_batch(engine, tokenizer, [r[1:] for r in chunk], max_tokens, exact)
        for j, (line, prompt, chosen, rejected) in enumerate(chunk):
            row = {"dataset": dataset, "pair_id": pair_id(prompt, chosen, rejected), "line": line}
            values = {k: float(v[j]) for k, v in res.items() if k != "truncated"}
            out.append(row | values | {"truncated": bool(res["truncated"][j])})
    return pa.Table.from_pylist(out, schema=PAIR_SCORES), bad


def autograd_pair(model, tokenizer, prompt: str, chosen: str, rejected: str, max_tokens: int) -> dict[str, float]:
    """Reference: the same quantities from torch.autograd on the full parameter gradient (for tests), on the
    same (truncated) tokens as ``pair_batch``."""
    from gradsift.models.adapter import per_sample_loss

    grads = []
    for it in encode_pair(tokenizer, prompt, chosen, rejected, max_tokens)[:2]:
        b = collate([it], tokenizer.pad_token_id)
        params = [p for p in model.parameters() if p.requires_grad]
        logp = -per_sample_loss(model(input_ids=b.input_ids).logits, b.labels, "causal_lm", "sum").sum()
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp, params)]).double())
    gw, gl = grads
    dot = float(gw @ gl)
    nw, nl = float(gw.norm()), float(gl.norm())
    return {"dot": dot, "cosine": dot / (nw * nl), "condition_ratio": dot / min(nw**2, nl**2)}
