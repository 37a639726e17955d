"""Offline domain mixture weights from gradient alignment with a target (no prefect or ray).

DoGE (Fan et al. 2023, "DoGE: Domain Reweighting with Generalization Estimation", eq. 4-6) and
DGA (Fan et al. 2024, "Dynamic Gradient Alignment for Online Data Mixing", eq. 3-5) move domain
weights by exponentiated gradient ascent on the alignment between each domain's gradient and the
target's gradient. Offline, from projected per-sample features at each checkpoint c:

    a_{c,d} = <mean_{z in d} g_c(z), mean_{z' in T} g_c(z')> / (mean_{z in d} ||g_c(z)|| * mean_{z' in T} ||g_c(z')||)
    alpha_d  proportional to  prior_d * exp(eta * sum_c a_{c,d}),   then  alpha <- (1 - s) alpha + s prior

The normalisation by mean gradient norms makes a_{c,d} scale-free (it is 1 when every sample of d
and of T has the same gradient); the smoothing s keeps every domain sampled (DGA's prior mixing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DomainSums:
    """Running sums of one feature set per group: sum of vectors, sum of norms, count."""

    vec: dict[str, np.ndarray] = field(default_factory=dict)
    norm: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def add(self, feats: np.ndarray, groups: np.ndarray, chunk: int = 2048) -> DomainSums:
        """Accumulate [B, k] features (any float dtype; summed in float64) under their group labels: per chunk
        of rows one float64 copy and ``add_rows``."""
        groups = np.asarray(groups)
        for i in range(0, len(feats), chunk):
            x = np.asarray(feats[i : i + chunk], dtype=np.float64)
            self.add_rows(x, np.sqrt(np.einsum("ij,ij->i", x, x)), groups[i : i + chunk])
        return self

    def add_rows(self, x: np.ndarray, norms: np.ndarray, groups: np.ndarray) -> DomainSums:
        """Accumulate rows ``x`` [r, k] with their L2 norms [r] under their group labels [r]: one product with the
        rows' group indicator matrix in ``x``'s dtype (float32 rows: influence's scoring chunks, relative error
        ~1e-7), the running sums in float64."""
        labels, inverse = np.unique(np.asarray(groups), return_inverse=True)
        onehot = np.zeros((len(labels), len(x)), dtype=x.dtype)
        onehot[inverse, np.arange(len(x))] = 1.0
        vec = (onehot @ x).astype(np.float64)
        norm = (onehot @ norms.astype(x.dtype)).astype(np.float64)
        counts = np.bincount(inverse, minlength=len(labels))
        for j, label in enumerate(labels):
            g = str(label)
            self.vec[g] = self.vec.get(g, 0.0) + vec[j]
            self.norm[g] = self.norm.get(g, 0.0) + float(norm[j])
            self.count[g] = self.count.get(g, 0) + int(counts[j])
        return self

    def merge(self, other: DomainSums) -> DomainSums:
        for g in other.count:
            self.vec[g] = self.vec.get(g, 0.0) + other.vec[g]
            self.norm[g] = self.norm.get(g, 0.0) + other.norm[g]
            self.count[g] = self.count.get(g, 0) + other.count[g]
        return self

    def mean(self, g: str) -> np.ndarray:
        return self.vec[g] / self.count[g]

    def mean_norm(self, g: str) -> float:
        return self.norm[g] / self.count[g]


def alignment(domains: DomainSums, target: DomainSums) -> dict[str, float]:
    """a_d = <mean gradient of d, mean target gradient> / (mean norm in d * mean target norm), one checkpoint.

    ``target`` holds every target sample under any group labels (they are pooled)."""
    t_vec = sum(target.vec.values())
    t_n = sum(target.count.values())
    t_mean, t_norm = t_vec / t_n, sum(target.norm.values()) / t_n
    return {
        d: float(domains.mean(d) @ t_mean / max(domains.mean_norm(d) * t_norm, 1e-30)) for d in sorted(domains.count)
    }


def mixture_weights(
    alignments: list[dict[str, float]], prior: dict[str, float], eta: float, smoothing: float
) -> dict[str, float]:
    """alpha_d proportional to prior_d exp(eta sum_c a_{c,d}), smoothed toward the prior (DoGE eq. 6, DGA eq. 5)."""
    names = sorted(prior)
    p = np.array([prior[d] for d in names], dtype=np.float64)
    p = p / p.sum()
    total = np.array([sum(a.get(d, 0.0) for a in alignments) for d in names])
    logits = np.log(np.maximum(p, 1e-300)) + eta * total
    alpha = np.exp(logits - logits.max())
    alpha = (1 - smoothing) * alpha / alpha.sum() + smoothing * p
    return dict(zip(names, alpha.tolist(), strict=True))
