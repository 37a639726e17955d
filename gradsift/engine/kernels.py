"""Batched per-sample gradient statistics from activations x and output gradients g.

All functions take x [B, T, d_in] and g [B, T, d_out] (pad positions already zeroed) and return
float32 per-sample results. See gradsift/engine/gradients.py for the math and sources,
gradsift/engine/handlers.py for which module uses which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Materialised per-sample gradients are built in chunks of at most this many elements.
MAX_CHUNK_ELEMENTS = 1 << 26


# From this many positions a Gram matrix is computed as GRAM_BLOCKS column blocks of its lower triangle.
GRAM_SPLIT_MIN = 128
GRAM_BLOCKS = 4


def gram_bounds(t: int) -> list[int]:
    """Boundaries s_0 = 0 < ... < s_k = t of the column blocks of a t x t Gram matrix (k = 1 below GRAM_SPLIT_MIN)."""
    k = GRAM_BLOCKS if t >= GRAM_SPLIT_MIN else 1
    return [t * i // k for i in range(k + 1)]


def gram_blocks(a: Tensor, acc: list[Tensor] | None = None) -> list[Tensor]:
    """The lower triangle of the symmetric a a^T by column blocks: block i is a[:, s_i:] a[:, s_i:s_i+1]^T,
    [B, T - s_i, s_i+1 - s_i], whose first s_i+1 - s_i rows are the (symmetric) diagonal block; 5/8 of the
    products of a a^T for 4 blocks. One tall product per block runs faster on the CPU than the square
    blocks or the full product (bench/RESULTS.md, issue 15). With ``acc`` (blocks of an earlier call) a a^T
    is added into it."""
    s = gram_bounds(a.shape[1])
    parts = [(a[:, s[i] :], a[:, s[i] : s[i + 1]]) for i in range(len(s) - 1)]
    if acc is None:
        return [torch.bmm(u, v.transpose(1, 2)).float() for u, v in parts]
    for out, (u, v) in zip(acc, parts, strict=True):
        if out.dtype == u.dtype:
            out.baddbmm_(u, v.transpose(1, 2))
        else:
            out.add_(torch.bmm(u, v.transpose(1, 2)).float())
    return acc


def gram_products(t: int, d: int) -> int:
    """Multiply-adds per sample of ``gram_blocks`` of a [T, d] input."""
    s = gram_bounds(t)
    return d * sum((t - s[i]) * (s[i + 1] - s[i]) for i in range(len(s) - 1))


def ghost_blocks(gx: list[Tensor], gg: list[Tensor], bias: bool = False) -> Tensor:
    """||sum_t g_t x_t^T||_F^2 = sum_{t,t'} (x_t.x_t')(g_t.g_t') (Li et al. 2022) from ``gram_blocks`` of x
    and g (entries below the diagonal blocks count twice), [B]. With ``bias`` the bias's ||sum_t g_t||^2 =
    sum_{t,t'} g_t.g_t' is added: the product with x x^T + 1."""
    out = None
    for x, g in zip(gx, gg, strict=True):
        p = torch.addcmul(g, x, g) if bias else x * g
        w = x.shape[2]
        v = p.sum(dim=(1, 2)) if p.shape[1] == w else 2 * p.sum(dim=(1, 2)) - p[:, :w].sum(dim=(1, 2))
        out = v if out is None else out + v
    return out


def materialise(x: Tensor, g: Tensor, b0: int, b1: int) -> Tensor:
    """Per-sample weight gradients G_i = g_i^T x_i for samples b0:b1, float32 [b, d_out, d_in]."""
    return torch.bmm(g[b0:b1].transpose(1, 2), x[b0:b1]).float()


def chunks(batch: int, per_sample: int) -> list[tuple[int, int]]:
    step = max(1, MAX_CHUNK_ELEMENTS // max(per_sample, 1))
    return [(i, min(batch, i + step)) for i in range(0, batch, step)]


def embedding_sq_norm(ids: Tensor, e: Tensor) -> Tensor:
    """||sum_t onehot(id_t) e_t^T||^2 = sum_v ||sum_{t: id_t = v} e_t||^2 over each sample's distinct ids v, [B]:
    the gradients of the positions sharing an id are summed (scatter into one slot per distinct id), O(T d)
    instead of the Gram's O(T^2 d)."""
    b, t, d = e.shape
    srt, order = ids.sort(dim=1)
    first = torch.ones_like(srt, dtype=torch.long)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = torch.empty_like(order).scatter_(1, order, first.cumsum(1) - 1)
    slot += torch.arange(b, device=e.device)[:, None] * t  # one row of ``sums`` per (sample, distinct id)
    sums = torch.zeros(b * t, d, dtype=torch.float32, device=e.device)
    sums.index_add_(0, slot.flatten(), e.reshape(b * t, d).float())
    return torch.linalg.vector_norm(sums.view(b, t * d), dim=1).square()


def embedding_materialise(ids: Tensor, e: Tensor, rows: int) -> Tensor:
    """Per-sample embedding-table gradients [B, rows, d] (float32)."""
    b, _, d = e.shape
    out = torch.zeros(b, rows, d, dtype=torch.float32, device=e.device)
    return out.scatter_add_(1, ids[:, :, None].expand(-1, -1, d), e.float())


def tied_cross(head_gather: Tensor, head_x: Tensor, e: Tensor) -> Tensor:
    """<G_emb, G_head> = sum_{s,t} g_s[id_t] (h_s.e_t) per sample, [B].

    head_gather[b, s, t] = g_s[id_t] (the LM-head output gradient gathered at the embedding ids),
    head_x = h [B, S, d], e = embedding output gradient [B, T, d].
    """
    he = torch.bmm(head_x, e.transpose(1, 2)).float()
    return (head_gather.float() * he).sum(dim=(1, 2))


def rms_xhat(x: Tensor, eps: float, cast: bool = True) -> Tensor:
    """x / rms(x) computed in float32; cast back to the input dtype (as LlamaRMSNorm does) when ``cast``."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return out.to(x.dtype) if cast else out


def layer_norm_xhat(x: Tensor, shape: tuple[int, ...], eps: float) -> Tensor:
    return F.layer_norm(x, shape, eps=eps)


def nuclear(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Nuclear norm and sigma_1 / nuclear of G_i = g_i^T x_i, float32, [B] each.

    G = g^T x has rank <= T. With g^T = Q1 R1 and x^T = Q2 R2 (reduced QR), G = Q1 (R1 R2^T) Q2^T, so
    the singular values of G are those of the small T x T matrix R1 R2^T; used when T < min(d_in, d_out),
    otherwise G is materialised (chunked).
    """
    b, t, d_in = x.shape
    d_out = g.shape[-1]
    if t < min(d_in, d_out):
        r1 = torch.linalg.qr(g.float().transpose(1, 2), mode="r")[1]
        r2 = torch.linalg.qr(x.float().transpose(1, 2), mode="r")[1]
        s = _svdvals(r1 @ r2.transpose(1, 2))
    else:
        s = torch.cat([torch.linalg.svdvals(materialise(x, g, i, j)) for i, j in chunks(b, d_in * d_out)])
    nuc = s.sum(dim=1).float()
    ratio = s[:, 0].float() / nuc.clamp_min(torch.finfo(torch.float32).tiny)
    return nuc, ratio


def _svdvals(m: Tensor, method: str | None = None) -> Tensor:
    """Singular values, descending. On CUDA batched svdvals of T x T matrices loops over samples and is
    slow (measured 17 s per 134M batch); there the eigenvalues of M M^T are taken in float64 instead."""
    method = method or ("eigh" if m.is_cuda else "svd")
    if method == "svd":
        return torch.linalg.svdvals(m)
    m = m.double()
    return torch.linalg.eigvalsh(m @ m.transpose(1, 2)).clamp_min(0).sqrt().flip(-1)
