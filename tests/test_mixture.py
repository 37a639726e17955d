"""Mixture weights move toward the domain whose gradients align with the target."""

from __future__ import annotations

import numpy as np

from gradsift.signals.mixture import DomainSums, alignment, mixture_weights


def test_weights_move_toward_aligned_domain():
    rng = np.random.default_rng(0)
    k = 64
    direction = rng.normal(size=k)
    target = direction + 0.5 * rng.normal(size=(50, k))
    feats = np.concatenate(
        [
            direction + 0.5 * rng.normal(size=(100, k)),  # aligned with the target
            -direction + 0.5 * rng.normal(size=(300, k)),  # opposed
            rng.normal(size=(200, k)),  # unrelated
        ]
    )
    groups = np.array(["math"] * 100 + ["code"] * 300 + ["general"] * 200)
    per_ckpt = []
    for _ in range(2):  # two checkpoints, features summed in two blocks each
        sums = DomainSums().add(feats[:250], groups[:250]).merge(DomainSums().add(feats[250:], groups[250:]))
        per_ckpt.append(alignment(sums, DomainSums().add(target, np.array(["t"] * 50))))
    a = per_ckpt[0]
    assert a["math"] > 0.5 > abs(a["general"]) and a["code"] < -0.5
    prior = {"math": 100.0, "code": 300.0, "general": 200.0}
    w = mixture_weights(per_ckpt, prior, eta=2.0, smoothing=0.1)
    assert abs(sum(w.values()) - 1) < 1e-12
    assert w["math"] == max(w.values()) and w["math"] > 100 / 600
    assert w["code"] < 300 / 600
    # eta = 0 gives the prior back; smoothing keeps every domain above smoothing * prior
    assert np.allclose(list(mixture_weights(per_ckpt, prior, 0.0, 0.1).values()), [0.5, 2 / 6, 1 / 6])
    assert min(w[d] / (prior[d] / 600) for d in w) >= 0.1 - 1e-12


def test_domain_sums_in_chunks_equal_direct_sums():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(53, 6)).astype(np.float16)
    groups = rng.choice(np.array(["a", "b", "c"]), size=53)
    sums = DomainSums().add(feats, groups, chunk=7)
    x = feats.astype(np.float64)
    for g in ("a", "b", "c"):
        sel = groups == g
        np.testing.assert_allclose(sums.vec[g], x[sel].sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(sums.norm[g], np.linalg.norm(x[sel], axis=1).sum(), rtol=1e-12)
        assert sums.count[g] == sel.sum()
