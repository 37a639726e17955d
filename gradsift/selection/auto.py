"""``select --auto``: pick score, direction and fraction on a validation split held out of the training data.

The split (stratified, seeded; never the user's test set) is set aside, a proxy is trained on the rest and scores
it; every candidate subset of the rest (score x direction x fraction, random included) is retrained and measured on
the split. The best candidate wins if its margin over random at its fraction exceeds the random seeds' spread;
otherwise none does and all data (or random, the user's choice) is kept. Candidates are ordered by the direction
rule (selection.direction) and cut to ``budget`` retrainings. Frozen mode: the proxy and every retraining are a head
on cached encoder embeddings, so a trial costs a head's training, not an encoder's. Pure numpy/torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from gradsift.models.embeddings import build_head
from gradsift.selection.by_score import hardness
from gradsift.selection.direction import Direction, direction_rule
from gradsift.selection.subsets import SelectionResult, keep_fraction, random_fraction
from gradsift.signals import dynamics as dyn

AUTO_SCORES = ("el2n", "aum", "forgetting")
"""Scores a head's training dynamics give (``head_dynamics``)."""


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, validation) indices: ``fraction`` of each label held out, chosen with ``seed``."""
    rng = np.random.default_rng([seed, 11])
    val = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        val.extend(rng.choice(idx, int(round(fraction * len(idx))), replace=False).tolist())
    held = np.zeros(len(labels), dtype=bool)
    held[val] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


@dataclass
class HeadRun:
    """A head trained on embeddings: the model, and per epoch whether each sample was right, its margin and EL2N."""

    model: torch.nn.Module
    correct: np.ndarray  # [N, E] bool
    margins: np.ndarray  # [N, E]
    el2n: np.ndarray  # [N, E]


def train_head(
    x: np.ndarray, y: np.ndarray, num_labels: int, epochs: int, seed: int, lr: float = 3e-3, hidden: int = 0
) -> HeadRun:
    """A head (linear, or one hidden ReLU layer of ``hidden`` units) trained with AdamW in shuffled batches of 64;
    the dynamics recorded after every epoch."""
    model = build_head(x.shape[1], num_labels, hidden=hidden, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    correct, margins, el2n = [], [], []
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        with torch.no_grad():
            logits = model(xt)
        correct.append((logits.argmax(1) == yt).numpy())
        margins.append(dyn.margin(logits, yt).numpy())
        el2n.append(dyn.el2n(logits, yt).numpy())
    return HeadRun(model, np.stack(correct, 1), np.stack(margins, 1), np.stack(el2n, 1))


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).argmax(1).numpy()
    return float((pred == y).mean())


def head_scores(run: HeadRun) -> dict[str, np.ndarray]:
    """EL2N (mean over epochs; Paul et al. 2021), AUM (Pleiss et al. 2020), forgetting events (Toneva et al. 2019)."""
    events, never = dyn.forgetting(run.correct)
    return {"el2n": run.el2n.mean(1), "aum": dyn.aum(run.margins), "forgetting": events, "never_learned": never}


@dataclass(frozen=True)
class Candidate:
    score: str  # a score, "random" or "all"
    drop: Literal["easy", "hard", ""]
    fraction: float

    @property
    def name(self) -> str:
        if self.score == "all":
            return "all"
        what = "random" if self.score == "random" else f"{self.score}-drop-{self.drop}"
        return f"{what}-keep{self.fraction:.2f}"


def candidates(
    scores: Sequence[str], fractions: Sequence[float], first: str, seeds: int, budget: int
) -> list[Candidate]:
    """All data and random at each fraction (always), then score x direction x fraction with the ``first``
    direction before the other, as many as ``budget`` retrainings (``seeds`` each) allow."""
    base = [Candidate("all", "", 1.0)] + [Candidate("random", "", f) for f in fractions]
    other = "hard" if first == "easy" else "easy"
    ranked = [Candidate(s, d, f) for d in (first, other) for f in fractions for s in scores]
    room = max(budget // seeds - len(base), 0)
    return base + ranked[:room]


@dataclass
class AutoResult:
    direction: Direction
    trials: list[dict] = field(default_factory=list)  # rows of ``selection_trials`` (without "selection")
    chosen: Candidate | None = None  # None: no candidate beat random by more than the seed spread
    reason: str = ""
    proxy_scores: dict[str, np.ndarray] = field(default_factory=dict)


def candidate_selection(c: Candidate, ids: np.ndarray, scores: dict, y: np.ndarray, seed: int) -> SelectionResult:
    """Candidate ``c``'s selection of ``ids`` (stratified by the labels ``y``; ``scores`` as ``head_scores``)."""
    if c.score == "all":
        return random_fraction(ids, 1.0, seed=seed, groups=y)
    if c.score == "random":
        return random_fraction(ids, c.fraction, seed=seed, groups=y)
    hard = hardness(c.score, scores[c.score], scores["never_learned"])
    drop = "low" if c.drop == "easy" else "high"
    return keep_fraction(ids, hard, c.fraction, drop=drop, groups=y, seed=seed, name=c.score)


def subset_mask(c: Candidate, ids: np.ndarray, scores: dict, y: np.ndarray, seed: int) -> np.ndarray:
    """Which of ``ids`` candidate ``c`` keeps."""
    return candidate_selection(c, ids, scores, y, seed).kept


def applied(auto: AutoResult, fractions: Sequence[float], when_none_wins: str) -> Candidate:
    """The candidate a selection applies: the chosen one, else all data or random at the first fraction."""
    if auto.chosen is not None:
        return auto.chosen
    return Candidate("random", "", fractions[0]) if when_none_wins == "random" else Candidate("all", "", 1.0)


def auto_reason(auto: AutoResult, when_none_wins: str) -> str:
    """What ``selections.reason`` says of an --auto selection: the pick, why, and the direction rule's reading."""
    return f"auto: {auto.chosen.name if auto.chosen else when_none_wins}: {auto.reason}; {auto.direction.reason}"


def proxy_direction(
    x: np.ndarray, y: np.ndarray, validation: float, epochs: int, split_seed: int = 0
) -> tuple[np.ndarray, np.ndarray, HeadRun, Direction]:
    """(rest, validation indices, the head proxy trained on the rest, the direction rule on its held-out accuracy
    and training dynamics): what --auto orders its candidates by, and ``select``'s default direction."""
    rest, val = stratified_split(y, validation, split_seed)
    proxy = train_head(x[rest], y[rest], int(y.max()) + 1, epochs, seed=split_seed)
    return rest, val, proxy, direction_rule(accuracy(proxy.model, x[val], y[val]), proxy.correct)


def auto_select(
    x: np.ndarray,
    y: np.ndarray,
    fractions: Sequence[float] = (0.55,),
    seeds: Sequence[int] = (0, 1, 2),
    budget: int = 60,
    validation: float = 0.2,
    epochs: int = 10,
    scores: Sequence[str] = AUTO_SCORES,
    split_seed: int = 0,
) -> AutoResult:
    """Every trial of ``select --auto`` on embeddings ``x`` with integer labels ``y`` (see the module)."""
    num_labels = int(y.max()) + 1
    rest, val, proxy, direction = proxy_direction(x, y, validation, epochs, split_seed)
    found = head_scores(proxy)
    result = AutoResult(direction, proxy_scores=found)
    ids = np.arange(len(rest))
    for c in candidates(scores, fractions, direction.drop, len(seeds), budget):
        for seed in seeds:
            kept = subset_mask(c, ids, found, y[rest], seed)
            run = train_head(x[rest][kept], y[rest][kept], num_labels, epochs, seed=seed)
            result.trials.append({
                "candidate": c.name, "score": c.score, "drop": c.drop, "fraction_kept": c.fraction, "seed": seed,
                "n_train": int(kept.sum()), "n_validation": len(val), "accuracy": accuracy(run.model, x[val], y[val]),
            })  # fmt: skip
    result.chosen, result.reason = choose(result.trials)
    for t in result.trials:
        t["chosen"] = result.chosen is not None and t["candidate"] == result.chosen.name
    return result


def choose(trials: list[dict]) -> tuple[Candidate | None, str]:
    """The candidate with the best mean accuracy whose margin over random at its fraction exceeds the random
    seeds' spread (max - min); None with the reason when none does."""
    by: dict[str, list[dict]] = {}
    for t in trials:
        by.setdefault(t["candidate"], []).append(t)
    mean = {k: float(np.mean([t["accuracy"] for t in v])) for k, v in by.items()}
    best: tuple[float, Candidate, str] | None = None
    for name, rows in by.items():
        first = rows[0]
        if first["score"] in ("all", "random"):
            continue
        rnd = [t["accuracy"] for t in by.get(f"random-keep{first['fraction_kept']:.2f}", [])]
        if not rnd:
            continue
        margin, spread = mean[name] - float(np.mean(rnd)), float(np.ptp(rnd))
        why = f"{name} {mean[name]:.4f}: {margin:+.4f} over random (seed spread {spread:.4f})"
        if margin > spread and (best is None or mean[name] > best[0]):
            best = (mean[name], Candidate(first["score"], first["drop"], first["fraction_kept"]), why)
    if best is None:
        return None, "no candidate beat random by more than the random seeds' spread"
    return best[1], best[2]
