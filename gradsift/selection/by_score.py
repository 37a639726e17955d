"""One selection from a ``SelectConfig``: orient the score (higher = harder), then keep a fraction (drop easy or
hard, stratified) or sample in proportion to a softmax of it; no score gives the random baseline."""

from __future__ import annotations

import numpy as np

from gradsift.schemas.train import SelectConfig
from gradsift.selection.subsets import SelectionResult, keep_fraction, proportional_sample, random_fraction, zscore

HIGHER_IS_EASIER = {"aum"}
"""Scores whose high values mean easy samples; for every other score high means hard."""


def hardness(score: str, values: np.ndarray, never_learned: np.ndarray) -> np.ndarray:
    """Scores oriented so that higher = harder; never-learned samples are the hardest (+inf) on forgetting."""
    v = -values if score in HIGHER_IS_EASIER else values.astype(np.float64)
    if score == "forgetting":
        v = np.where(never_learned, np.inf, v)
    return v


def select_one(config: SelectConfig, frame: dict, fraction: float, seed: int) -> SelectionResult:
    """One selection of ``config`` at ``fraction`` kept with ``seed``."""
    ids = frame["sample_id"]
    groups = None if config.stratify == "none" else frame[config.stratify]
    if config.score is None:
        return random_fraction(ids, fraction, seed=seed, groups=groups)
    hard = hardness(config.score, frame[config.score], frame["never_learned"])
    drop = "low" if config.drop == "easy" else "high"
    if config.method == "keep":
        return keep_fraction(ids, hard, fraction, drop=drop, groups=groups, seed=seed, name=config.score)
    z = zscore(np.where(np.isfinite(hard), hard, np.nanmax(hard[np.isfinite(hard)], initial=0.0)))
    n = int(round(fraction * len(ids)))
    return proportional_sample(ids, z if drop == "low" else -z, n, config.temperature, seed, groups, config.score)


def selection_name(config: SelectConfig, fraction: float, seed: int) -> str:
    what = f"{config.score}-{config.method}-drop-{config.drop}" if config.score else "random"
    return f"{what}-keep{fraction:.2f}-seed{seed}"
