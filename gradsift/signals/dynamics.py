"""Training-dynamics scores: formulas over logits, visit logs and checkpoint gradients.

Pure torch/numpy (no prefect or ray). Shapes: N samples, C classes, V visits (one per epoch),
K checkpoints, S seeds. For causal LMs every per-token quantity is averaged over the sample's
target tokens, so one formula serves both task types.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gradsift.models.adapter import TaskType, adapter
from gradsift.selection.subsets import zscore


def _per_sample_mean(values: Tensor, owner: Tensor, n: int) -> Tensor:
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, owner, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, owner, torch.ones_like(values))
    return total / count.clamp(min=1)


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Margin of each row: gold logit minus the largest other logit, [M, C], [M] -> [M]
    (Pleiss et al. 2020, "Identifying Mislabeled Data using the Area Under the Margin Ranking")."""
    return _margin_argmax(logits, labels)[0]


def _margin_argmax(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(margin, argmax) of each row from its two largest logits: the largest other logit is the second one where
    the gold label is the argmax, else the first (one pass, no copy of the logits, no host sync)."""
    top, index = logits.topk(2, dim=1)
    argmax = index[:, 0]
    gold = logits.gather(1, labels[:, None]).squeeze(1)
    other = torch.where(argmax == labels, top[:, 1], top[:, 0])
    return gold - other, argmax


def el2n(logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N = || softmax(f(x)) - onehot(y) ||_2 per row, [M, C], [M] -> [M]
    (Paul et al. 2021, "Deep Learning on a Data Diet: Finding Important Examples Early in Training")."""
    return _minus_onehot(F.softmax(logits.float(), dim=-1), labels).norm(dim=-1)


def _minus_onehot(probs: Tensor, labels: Tensor) -> Tensor:
    """probs - onehot(labels), in place (the one-hot is not built)."""
    return probs.scatter_add_(1, labels[:, None], torch.full_like(probs[:, :1], -1.0))


@torch.no_grad()
def visit_stats(logits: Tensor, labels: Tensor, task: TaskType, loss: Tensor | None = None) -> dict[str, Tensor]:
    """What the dynamics log keeps each time a sample is seen: loss, pred, correct, margin, el2n ([B] each).

    Classification: pred is the argmax class, correct is pred == label. Causal LM: pred is -1,
    correct means at least half of the target tokens are the argmax, margin and el2n are token means.
    ``loss``: the per-sample loss when the caller has it already (the training step), else computed here.
    """
    flat_logits, flat_labels, owner = adapter(task).token_view(logits, labels)
    stats, _ = token_stats(flat_logits, flat_labels, owner, labels.shape[0], task)
    if loss is not None:
        stats["loss"] = loss.detach()
    return stats


@torch.no_grad()
def token_stats(
    flat_logits: Tensor, flat_labels: Tensor, owner: Tensor, n: int, task: TaskType
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``visit_stats`` from the adapter's token view ([M, C] logits, [M] labels, [M] owning sample), one softmax
    pass: (per-sample loss, pred, correct, margin, el2n, [n] each; per token: loss, el2n, and ``residual``
    [M, C], the gradient of the token's cross-entropy w.r.t. its logits). The loss is the mean of the sample's token
    cross-entropies, as ``per_sample_loss`` defines it for both adapters."""
    logp = F.log_softmax(flat_logits.float(), dim=-1)
    token_loss = -logp.gather(1, flat_labels[:, None]).squeeze(1)
    r = _minus_onehot(logp.exp_(), flat_labels)
    token_el2n = r.norm(dim=-1)
    token_margin, argmax = _margin_argmax(flat_logits, flat_labels)
    hit = (argmax == flat_labels).float()
    if task == "classification":
        pred, correct = argmax, hit.bool()
    else:
        pred = torch.full((n,), -1, dtype=torch.long, device=flat_labels.device)
        correct = _per_sample_mean(hit, owner, n) >= 0.5
    per_sample = {
        "loss": _per_sample_mean(token_loss, owner, n),
        "pred": pred,
        "correct": correct,
        "margin": _per_sample_mean(token_margin, owner, n),
        "el2n": _per_sample_mean(token_el2n, owner, n),
    }
    return per_sample, {"loss": token_loss, "el2n": token_el2n, "residual": r}


def gold_logit(logits: Tensor, labels: Tensor, task: TaskType) -> Tensor:
    """Per-sample gold-label logit (token mean for causal LMs), [B]; VoG differentiates it."""
    flat_logits, flat_labels, owner = adapter(task).token_view(logits, labels)
    return _per_sample_mean(flat_logits.gather(1, flat_labels[:, None]).squeeze(1), owner, labels.shape[0])


def forgetting(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forgetting events per sample: transitions correct -> incorrect between consecutive visits,
    [N, V] bool -> ([N] int, never_learned [N] bool). A sample never classified correctly is marked
    never_learned (it is the most forgettable, not a zero)
    (Toneva et al. 2019, "An Empirical Study of Example Forgetting during Deep Neural Network Learning")."""
    c = np.asarray(correct, dtype=bool)
    events = (c[:, :-1] & ~c[:, 1:]).sum(axis=1).astype(np.int32)
    return events, ~c.any(axis=1)


def aum(margins: np.ndarray) -> np.ndarray:
    """AUM = (1/V) sum_v (gold logit - largest other logit) at visit v, [N, V] -> [N]; mislabelled
    samples have low (negative) AUM (Pleiss et al. 2020)."""
    return np.asarray(margins, dtype=np.float64).mean(axis=1)


def aum_threshold(threshold_sample_aums: np.ndarray, percentile: float = 99.0) -> float:
    """Pleiss et al. 2020 threshold samples: N/(C+1) samples are given a fake extra class, so they are
    mislabelled by construction; samples whose AUM is below the ``percentile`` of theirs are flagged."""
    return float(np.percentile(np.asarray(threshold_sample_aums, dtype=np.float64), percentile))


def vog(input_grads: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """VoG = mean over tokens and dimensions of the variance across checkpoints of the gradient of the
    gold-label logit w.r.t. the embedding-layer output (Agarwal et al. 2022, "Estimating Example
    Difficulty using Variance of Gradients", as used for text by Anand et al. 2023, "Influence
    Scores at Scale for Efficient Language Data Sampling").

    input_grads: K tensors [B, T, H] (or [B, H] for a head on pooled embeddings); mask [B, T] marks
    real tokens. Returns raw VoG [B]; z-normalise with ``zscore``.
    """
    g = torch.stack([x.float() for x in input_grads])  # [K, B, ...]
    var = g.var(dim=0, unbiased=False)  # [B, T, H] or [B, H]
    if var.dim() == 2:
        return var.mean(dim=1)
    m = torch.ones(var.shape[:2], device=var.device) if mask is None else mask.to(var.dtype)
    return (var.mean(dim=2) * m).sum(1) / m.sum(1).clamp(min=1)


def grand(grad_norms: np.ndarray) -> np.ndarray:
    """GraNd = E_seeds || grad_w loss(x, y) ||_2 at an early checkpoint, [S, N] -> [N] (Paul et al. 2021)."""
    return np.asarray(grad_norms, dtype=np.float64).mean(axis=0)


def tracin_self_influence(lrs: Sequence[float], grad_norms: np.ndarray) -> np.ndarray:
    """TracIn self-influence = sum_c lr_c * || grad_w loss(x, y) at checkpoint c ||^2, [K], [K, N] -> [N]
    (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent")."""
    g = np.asarray(grad_norms, dtype=np.float64)
    return (np.asarray(lrs, dtype=np.float64)[:, None] * g**2).sum(axis=0)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` ranking the ``positive`` samples first (ties count half)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    n_pos, n_neg = y.sum(), (~y).sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def combine_seeds(seeds: Sequence, groups: np.ndarray | None, gradient_scores: bool) -> dict[str, np.ndarray]:
    """One score per sample from several proxy seeds (frames with a row per sample, same order).

    Means over seeds: el2n, grand, aum, self_influence, loss, raw VoG (then z-normalised within ``groups``, e.g.
    classes, or over the dataset); forgetting events are summed; never_learned means never learned in any seed.
    Seeds in which a sample was a threshold sample (NaN) do not count for it; a sample with no seed is NaN
    (masked: null in SQL)."""

    def stack(key: str) -> np.ndarray:  # [S, N], NaN where a seed has no score (its threshold samples)
        return np.stack([s[key].to_numpy(dtype=np.float64) for s in seeds])

    with warnings.catch_warnings():  # a sample that was a threshold sample in every seed: all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {k: np.nanmean(stack(k), axis=0) for k in ("el2n", "grand", "aum", "vog", "self_influence", "loss")}
    scored = ~np.isnan(stack("loss"))
    missing = ~scored.any(axis=0)
    vog_z = np.full(missing.shape, np.nan)
    if gradient_scores:
        vog_z[~missing] = zscore(mean["vog"][~missing], None if groups is None else groups[~missing])
    forgot = np.ma.masked_array(np.nansum(stack("forgetting"), axis=0).astype(np.int32), mask=missing)
    never = np.ma.masked_array(((stack("never_learned") == 1) | ~scored).all(axis=0), mask=missing)
    return {**{k: v for k, v in mean.items() if k != "vog"}, "vog": vog_z, "forgetting": forgot, "never_learned": never}
