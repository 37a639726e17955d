"""Seeded LoGra-style random projection of per-sample gradients.

Reference: Choe et al. 2024, "What is Your Data Worth to GPT? LLM-Scale Data Valuation with
Influence Functions" (LoGra). A matrix gradient G (rows x cols; for a Linear: d_out x d_in, the bias
folded in as one extra input column; a Conv1D weight, stored d_in x d_out, is projected as its transpose) is projected with two Gaussian factors,
``P_R^T G P_C`` (k_R x k_C). For G = sum_t g_t x_t^T this is ``(g P_R)^T (x P_C)``: it is computed from
the activations without materialising G. Each factor is N(0, 1/k) so E[P P^T] = I, and inner
products of projected gradients equal those of the full gradients in expectation.

Split of ``feature_dim`` (documented contract): every matrix block m (Linear weight with its bias,
embedding table) gets a budget b_m = feature_dim * numel_m / sum_j numel_j (its share of the
parameters, as a dense projection of the whole gradient would implicitly give it), where the sum also
counts one "vector block" holding every normalisation weight/bias; k_R = floor(sqrt(b_m))
and k_C = floor(b_m / k_R), capped at the block's dimensions. All dimensions left over go to the
vector block (a dense Gaussian projection of the concatenated norm-layer gradients); when the model
has no vector parameters (e.g. LoRA mode) the leftover columns are zeros, so the output always has
exactly ``feature_dim`` columns. Sizing by parameter count gives the large blocks that dominate the
gradient (LM head, embeddings, MLP) the most dimensions (measured: it tracks full-gradient cosines
better than sizing by sqrt(numel)).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor


def _gaussian(rows: int, k: int, seed: int, tag: str) -> Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{tag}".encode()) + seed * 1_000_003)
    return torch.randn(rows, k, generator=gen, dtype=torch.float32) / math.sqrt(k)


@dataclass
class MatrixBlock:
    """Projection of one matrix parameter ``weight`` [rows, cols] (+ optional folded ``bias`` [rows])."""

    weight: str
    bias: str | None
    rows: int
    cols: int
    k_rows: int
    k_cols: int
    offset: int
    transposed: bool = False  # the parameter is stored [cols, rows] (transformers Conv1D)
    p_rows: Tensor | None = None  # [rows, k_rows]
    p_cols: Tensor | None = None  # [cols + (bias is not None), k_cols]

    @property
    def dim(self) -> int:
        return self.k_rows * self.k_cols


class GradientProjector:
    """Projects per-sample gradients to ``feature_dim`` columns, reproducibly from ``seed``.

    Build it from the parameter layout (``PerSampleGradients.projector`` does this); use
    ``project_flat`` for an arbitrary flattened per-sample gradient [B, P] laid out like
    ``PerSampleGradients.param_names`` / ``param_shapes`` (e.g. LESS: materialised LoRA gradient ->
    Adam transform -> project).
    """

    def __init__(
        self,
        matrices: list[tuple[str, str | None, int, int]],
        vectors: list[tuple[str, int]],
        feature_dim: int,
        seed: int = 0,
        transposed: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        self.feature_dim = feature_dim
        self.seed = seed
        weights = [float(r * (c + (b is not None))) for _, b, r, c in matrices]
        vec_total = sum(n for _, n in vectors)
        total_w = sum(weights) + float(vec_total)
        self.blocks: dict[str, MatrixBlock] = {}
        offset = 0
        for (name, bias, rows, cols), w in zip(matrices, weights, strict=True):
            budget = max(1, int(feature_dim * w / total_w))
            c_aug = cols + (bias is not None)
            k_r = min(rows, max(1, math.isqrt(budget)))
            k_c = min(c_aug, max(1, budget // k_r))
            k_r = min(rows, max(1, budget // k_c))
            blk = MatrixBlock(name, bias, rows, cols, k_r, k_c, offset, name in transposed)
            blk.p_rows = _gaussian(rows, k_r, seed, name + ":rows")
            blk.p_cols = _gaussian(c_aug, k_c, seed, name + ":cols")
            self.blocks[name] = blk
            offset += blk.dim
        if offset > feature_dim:
            raise ValueError(f"feature_dim={feature_dim} is too small for {len(matrices)} projected modules")
        self.vector_offset = offset
        self.vector_dim = feature_dim - offset if vec_total else 0
        self.vector_rows: dict[str, tuple[int, int]] = {}  # name -> (row offset, length) in p_vec
        row = 0
        for name, n in vectors:
            self.vector_rows[name] = (row, n)
            row += n
        self.p_vec = _gaussian(vec_total, self.vector_dim, seed, "vectors") if self.vector_dim else None
        self._cache: dict[tuple, Tensor] = {}

    # -- device copies -------------------------------------------------------------------------
    def factor(self, name: str, which: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, which, device, dtype)
        out = self._cache.get(key)
        if out is None:
            if which == "vec":
                start, n = self.vector_rows[name]
                src = self.p_vec[start : start + n]
            else:
                src = getattr(self.blocks[name], which)
            out = self._cache[key] = src.to(device=device, dtype=dtype)
        return out

    # -- projection from activations ------------------------------------------------------------
    def project_linear(self, name: str, x: Tensor, g: Tensor, out: Tensor) -> None:
        """Add (g P_R)^T (x P_C) of block ``name`` into ``out`` [B, feature_dim]. x [B,T,C], g [B,T,R]."""
        blk = self.blocks[name]
        pr = self.factor(name, "p_rows", g.device, g.dtype)
        pc = self.factor(name, "p_cols", x.device, x.dtype)
        gp = g @ pr
        xp = x @ pc[: blk.cols]
        if blk.bias is not None:
            xp = xp + pc[blk.cols]
        feat = torch.bmm(gp.transpose(1, 2), xp).reshape(g.shape[0], -1)
        out[:, blk.offset : blk.offset + blk.dim] += feat.float()

    def project_embedding(self, name: str, ids: Tensor, e: Tensor, out: Tensor) -> None:
        """Embedding table gradient sum_t onehot(id_t) e_t^T: (P_R[ids])^T (e P_C)."""
        blk = self.blocks[name]
        pr = self.factor(name, "p_rows", e.device, e.dtype)
        pc = self.factor(name, "p_cols", e.device, e.dtype)
        feat = torch.bmm(pr[ids].transpose(1, 2), e @ pc).reshape(e.shape[0], -1)
        out[:, blk.offset : blk.offset + blk.dim] += feat.float()

    def project_vector(self, name: str, v: Tensor, out: Tensor) -> None:
        """A vector parameter's per-sample gradient v [B, n] into the vector block."""
        if self.p_vec is None:
            return
        p = self.factor(name, "vec", v.device, v.dtype)
        out[:, self.vector_offset : self.vector_offset + self.vector_dim] += (v @ p).float()

    # -- projection of a flattened gradient -------------------------------------------------------
    def project_flat(self, flat: Tensor, names: list[str], shapes: list[tuple[int, ...]]) -> Tensor:
        """Project flattened per-sample gradients [B, P] laid out as ``names``/``shapes`` -> [B, feature_dim].

        Gives the same features as the engine computes from activations for the same gradient.
        """
        b = flat.shape[0]
        out = torch.zeros(b, self.feature_dim, dtype=torch.float32, device=flat.device)
        bias_of = {blk.bias: blk for blk in self.blocks.values() if blk.bias is not None}
        start = 0
        for name, shape in zip(names, shapes, strict=True):
            n = math.prod(shape)
            piece = flat[:, start : start + n].float()
            start += n
            if name in self.blocks:
                blk = self.blocks[name]
                pr = self.factor(name, "p_rows", flat.device, torch.float32)
                pc = self.factor(name, "p_cols", flat.device, torch.float32)
                mat = (
                    piece.view(b, blk.cols, blk.rows).transpose(1, 2)
                    if blk.transposed
                    else piece.view(b, blk.rows, blk.cols)
                )
                feat = pr.T @ mat @ pc[: blk.cols]
                out[:, blk.offset : blk.offset + blk.dim] += feat.reshape(b, -1)
            elif name in bias_of:
                blk = bias_of[name]
                pr = self.factor(blk.weight, "p_rows", flat.device, torch.float32)
                pc = self.factor(blk.weight, "p_cols", flat.device, torch.float32)
                feat = (piece @ pr)[:, :, None] * pc[blk.cols][None, None, :]
                out[:, blk.offset : blk.offset + blk.dim] += feat.reshape(b, -1)
            elif name in self.vector_rows:
                self.project_vector(name, piece, out)
            else:
                raise KeyError(f"parameter {name!r} is not part of this projector")
        if start != flat.shape[1]:
            raise ValueError(f"flat gradient has {flat.shape[1]} columns, layout covers {start}")
        return out
