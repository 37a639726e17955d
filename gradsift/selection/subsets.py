"""Selections: which samples to keep, from per-sample scores (pure numpy; no prefect or ray).

Every function takes parallel arrays (sample ids, scores, optional groups) and returns a
``SelectionResult``: which ids are kept and a preference rank over all of them. ``selection_table``
turns a result into rows of the ``selections`` table. The building blocks are generic, so other
presets reuse them: "top p% for a target" is ``keep_fraction(ids, influence, p, drop="low")``,
mixture-weighted sampling is ``group_quotas(groups, n, weights)`` then a selector per group.

Conventions: ties and sampling are broken by a seeded ``numpy.random.Generator`` (the same inputs
and seed give the same selection); scores may be +-inf (e.g. never-learned samples ranked hardest)
but not NaN; ``rank`` is 0 for the most preferred sample and grows towards those dropped first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from gradsift.schemas.tables import SELECTIONS

Drop = Literal["low", "high"]


@dataclass
class SelectionResult:
    """One selection over ``ids``: ``kept[i]`` says whether ids[i] is kept; ``rank[i]`` its preference
    (0 = kept first). ``reason`` says how (e.g. "el2n drop low 30% by label")."""

    ids: np.ndarray
    kept: np.ndarray
    rank: np.ndarray
    reason: str

    @property
    def kept_ids(self) -> np.ndarray:
        """Kept ids in preference order."""
        order = np.argsort(self.rank[self.kept], kind="stable")
        return self.ids[self.kept][order]

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())


def group_quotas(groups: Sequence, n: int, weights: Mapping | None = None) -> dict:
    """How many of ``n`` picks each group gets: proportional to ``weights`` (default: group sizes),
    by largest remainder so the quotas sum to exactly ``n``, and never more than a group holds
    (the surplus goes to the other groups by the same rule)."""
    labels, sizes = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
    size = dict(zip(labels.tolist(), sizes.tolist(), strict=True))
    n = min(int(n), int(sizes.sum()))
    w = {g: float(weights.get(g, 0.0)) if weights is not None else float(size[g]) for g in size}
    quota = dict.fromkeys(size, 0)
    open_groups = [g for g in size if w[g] > 0]
    while n - sum(quota.values()) > 0 and open_groups:
        left = n - sum(quota.values())
        total = sum(w[g] for g in open_groups)
        ideal = {g: left * w[g] / total for g in open_groups}
        add = {g: int(np.floor(ideal[g])) for g in open_groups}
        by_remainder = sorted(open_groups, key=lambda g: (-(ideal[g] - add[g]), g))
        for g in by_remainder[: left - sum(add.values())]:
            add[g] += 1
        for g in open_groups:
            quota[g] = min(size[g], quota[g] + add[g])
        open_groups = [g for g in open_groups if quota[g] < size[g]]
    return quota


def _order(scores: np.ndarray, drop: Drop, rng: np.random.Generator) -> np.ndarray:
    """Indices from most to least preferred: drop="low" prefers high scores; ties in random order."""
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN: fill them first (e.g. +inf for never-learned samples)")
    tiebreak = rng.permutation(len(scores))
    key = -scores if drop == "low" else scores
    return np.lexsort((tiebreak, key))


def _pick(order: np.ndarray, n_total: int, groups: Sequence | None) -> np.ndarray:
    """Keep mask taking ``order`` front first, within each group's quota when groups are given."""
    kept = np.zeros(len(order), dtype=bool)
    if groups is None:
        kept[order[:n_total]] = True
        return kept
    g = np.asarray(groups, dtype=object).astype(str)
    left = group_quotas(g, n_total)
    for i in order:
        if left[g[i]] > 0:
            kept[i] = True
            left[g[i]] -= 1
    return kept


def ranks(order: np.ndarray) -> np.ndarray:
    """The rank of every item given ``order`` (indices, most preferred first): ``rank[order[k]] == k``.

    The one rank function of gradsift: selections rank by their preference order, influence by
    ``score_ranks``."""
    order = np.asarray(order)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def score_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank 0 for the highest score; ties by position."""
    return ranks(np.argsort(-np.asarray(scores), kind="stable"))


def _n_keep(n: int, fraction: float) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return int(round(n * fraction))


def keep_fraction(
    ids: Sequence,
    scores: Sequence[float],
    fraction: float,
    drop: Drop = "low",
    groups: Sequence | None = None,
    seed: int = 0,
    name: str = "score",
) -> SelectionResult:
    """Keep ``fraction`` of the samples, dropping those with the lowest (``drop="low"``) or highest
    scores; with ``groups`` (label, domain) each group keeps the same fraction of itself."""
    ids, s = np.asarray(ids, dtype=object), np.asarray(scores, dtype=np.float64)
    order = _order(s, drop, np.random.default_rng(seed))
    kept = _pick(order, _n_keep(len(ids), fraction), groups)
    by = " stratified" if groups is not None else ""
    return SelectionResult(ids, kept, ranks(order), f"{name} keep {fraction:.0%} drop {drop}{by}")


def random_fraction(ids: Sequence, fraction: float, seed: int = 0, groups: Sequence | None = None) -> SelectionResult:
    """The random baseline: keep ``fraction`` uniformly at random (per group with ``groups``)."""
    ids = np.asarray(ids, dtype=object)
    order = np.random.default_rng(seed).permutation(len(ids))
    kept = _pick(order, _n_keep(len(ids), fraction), groups)
    by = " stratified" if groups is not None else ""
    return SelectionResult(ids, kept, ranks(order), f"random keep {fraction:.0%} seed {seed}{by}")


def proportional_sample(
    ids: Sequence,
    scores: Sequence[float],
    n: int,
    temperature: float = 1.0,
    seed: int = 0,
    groups: Sequence | None = None,
    name: str = "score",
) -> SelectionResult:
    """Sample ``n`` ids without replacement, each draw with probability softmax(score / temperature)
    over those not yet drawn (Gumbel top-k: argsort of score/T + Gumbel noise is exactly that
    successive sampling). Low temperature approaches top-n; high temperature approaches uniform."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids, s = np.asarray(ids, dtype=object), np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError("proportional sampling needs finite scores")
    gumbel = np.random.default_rng(seed).gumbel(size=len(s))
    order = np.argsort(-(s / temperature + gumbel), kind="stable")
    kept = _pick(order, min(int(n), len(ids)), groups)
    return SelectionResult(ids, kept, ranks(order), f"{name} softmax sample {n} T={temperature:g} seed {seed}")


def selection_table(result: SelectionResult, selection: str, datasets: Sequence[str] | str) -> pa.Table:
    """Rows of the ``selections`` table (schema ``SELECTIONS``) for one selection."""
    n = len(result.ids)
    dataset = [datasets] * n if isinstance(datasets, str) else list(datasets)
    return pa.Table.from_pydict(
        {
            "selection": [selection] * n,
            "dataset": dataset,
            "sample_id": [str(i) for i in result.ids],
            "kept": result.kept.tolist(),
            "rank": result.rank.tolist(),
            "reason": [result.reason] * n,
        },
        schema=SELECTIONS,
    )


def weighted_sample(
    ids: list, domains: list[str], budget: int, weights: dict[str, float], seed: int
) -> SelectionResult:
    """Sample ``budget`` ids with domain quotas proportional to ``weights`` (uniform within a domain)."""
    ids_a, dom = np.asarray(ids, dtype=object), np.asarray(domains, dtype=object)
    quotas = group_quotas(dom, budget, weights)
    kept = np.zeros(len(ids_a), dtype=bool)
    key = np.ones(len(ids_a))
    for d, q in quotas.items():
        sel = np.flatnonzero(dom == d)
        sub = proportional_sample(ids_a[sel], np.zeros(len(sel)), q, seed=seed)
        kept[sel] = sub.kept
        key[sel] = sub.rank / max(len(sel), 1)
    rank = ranks(np.lexsort((key, ~kept)))
    reason = "mixture sample " + ", ".join(f"{d}={w:.3f}" for d, w in sorted(weights.items()))
    return SelectionResult(ids_a, kept, rank, reason)


def zscore(values: np.ndarray, groups: Sequence | None = None) -> np.ndarray:
    """(v - mean) / std over the dataset, or within each group (class) when ``groups`` is given."""
    v = np.asarray(values, dtype=np.float64)
    out = np.empty_like(v)
    keys = np.zeros(len(v), dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    for k in np.unique(keys):
        sel = keys == k
        out[sel] = (v[sel] - v[sel].mean()) / (v[sel].std() or 1.0)
    return out
