"""Selections: fractions, drop sides, stratification, random baseline, softmax sampling, table rows."""

from __future__ import annotations

import numpy as np
import pytest

from gradsift.schemas.tables import SELECTIONS
from gradsift.selection.subsets import (
    group_quotas,
    keep_fraction,
    proportional_sample,
    random_fraction,
    ranks,
    score_ranks,
    selection_table,
)

IDS = [f"s{i}" for i in range(10)]
SCORES = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0]


def test_keep_fraction_drops_the_chosen_side():
    low = keep_fraction(IDS, SCORES, 0.3, drop="low")
    assert sorted(low.kept_ids) == ["s2", "s4", "s6"]
    assert list(low.kept_ids) == ["s2", "s6", "s4"]  # preference order: highest first
    high = keep_fraction(IDS, SCORES, 0.3, drop="high")
    assert list(high.kept_ids) == ["s9", "s1", "s5"]
    assert low.rank[2] == 0 and high.rank[9] == 0


def test_keep_fraction_inf_ranks_last_and_nan_is_refused():
    scores = [1.0, np.inf, 2.0, 0.5]
    assert list(keep_fraction(IDS[:4], scores, 0.5, drop="high").kept_ids) == ["s3", "s0"]
    with pytest.raises(ValueError, match="NaN"):
        keep_fraction(IDS[:4], [1.0, np.nan, 2.0, 0.5], 0.5)


def test_stratified_keeps_each_group_in_proportion():
    groups = ["a"] * 6 + ["b"] * 4
    res = keep_fraction(IDS, SCORES, 0.5, drop="low", groups=groups)
    kept_groups = [g for g, k in zip(groups, res.kept, strict=True) if k]
    assert kept_groups.count("a") == 3 and kept_groups.count("b") == 2
    # within b (s6..s9: 0.8 0.4 0.6 0.0) the two highest are kept
    assert res.kept[6] and res.kept[8] and not res.kept[7] and not res.kept[9]


def test_group_quotas_sum_exactly_and_respect_sizes():
    assert group_quotas(["a"] * 5 + ["b"] * 3 + ["c"] * 2, 7) == {"a": 4, "b": 2, "c": 1}
    # weights ask for more of c than it holds: the surplus moves to the others
    q = group_quotas(["a"] * 5 + ["b"] * 5 + ["c"] * 1, 8, weights={"a": 1, "b": 1, "c": 8})
    assert q["c"] == 1 and sum(q.values()) == 8


def test_random_fraction_is_seeded():
    a, b, c = random_fraction(IDS, 0.4, seed=1), random_fraction(IDS, 0.4, seed=1), random_fraction(IDS, 0.4, seed=2)
    assert a.n_kept == 4 and list(a.kept_ids) == list(b.kept_ids)
    assert set(a.kept_ids) != set(c.kept_ids)


def test_proportional_sample_matches_softmax_and_temperature_limits():
    scores = np.array([0.0, 1.0, 2.0])
    counts = np.zeros(3)
    for seed in range(3000):
        counts[proportional_sample(["a", "b", "c"], scores, 1, temperature=1.0, seed=seed).kept] += 1
    expected = np.exp(scores) / np.exp(scores).sum()
    assert np.allclose(counts / counts.sum(), expected, atol=0.03)
    cold = proportional_sample(IDS, SCORES, 3, temperature=1e-4, seed=0)
    assert set(cold.kept_ids) == {"s2", "s4", "s6"}


def test_selection_table_schema():
    table = selection_table(keep_fraction(IDS, SCORES, 0.5), "el2n-50", "agnews")
    assert table.schema == SELECTIONS
    assert table.num_rows == 10 and sum(table.column("kept").to_pylist()) == 5


def test_one_rank_function_for_orders_and_scores():
    order = np.array([2, 0, 3, 1])
    assert ranks(order).tolist() == [1, 3, 0, 2]
    assert score_ranks(np.array([0.5, 0.9, 0.5, -np.inf])).tolist() == [1, 0, 2, 3]  # ties by position
    res = keep_fraction(IDS, SCORES, 0.3, drop="low", seed=0)
    assert sorted(res.rank.tolist()) == list(range(len(IDS))) and res.rank[np.argmax(SCORES)] == 0
