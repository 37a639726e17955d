"""Fused per-sample Linear backward for in-run capture: the weight gradient from the per-sample gradients.

Where the engine would materialise a Linear's per-sample weight gradients G_i = g_i^T x_i (its cost rule,
``MicroBatch.materialise``: cheaper than the ghost norm when T < d_in d_out / (d_in + d_out), e.g. every
projection of a small model at 128 tokens), the training step's own backward computes the same products once
more, summed: grad_W = sum_i G_i. Here that module's forward runs as ``FusedLinear``, whose backward builds G
once, records ||G_i||^2 (and the bias's, and the LoGra features) into the micro-batch, and returns sum_i G_i as
the weight gradient, so the step's grad_W matmul is not run. Pad positions are zeroed in G as in the engine
(per-sample statistics over real tokens); their products are added to grad_W apart, so it is the step's exact
gradient. Eager float32/float64 only: under autocast the module keeps the engine's hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsift.engine.handlers import LinearHandler
from gradsift.engine.kernels import MAX_CHUNK_ELEMENTS
from gradsift.engine.state import Covered, MicroBatch


def fusable(m: Covered) -> bool:
    """Whether module ``m`` can run as ``FusedLinear`` (a plain trainable nn.Linear, not a tied head)."""
    plain = type(m.handler) is LinearHandler and type(m.module).forward is nn.Linear.forward
    return plain and m.weight is not None and m.tied_to is None and not m.nuclear


def fuse_now(st: MicroBatch, mod: nn.Linear, x: Tensor) -> bool:
    """Whether this call of ``mod`` on ``x`` is fused: eager float math, the engine would materialise G (its cost
    rule) and G fits one chunk of the engine's memory bound."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype != mod.weight.dtype or x.dim() < 2:
        return False
    d_out, d_in = mod.weight.shape
    tokens = x.numel() // (x.shape[0] * x.shape[-1])
    return x.shape[0] * d_in * d_out <= MAX_CHUNK_ELEMENTS and st.materialise(tokens, d_in, d_out)


def fused_grads(st: MicroBatch, m: Covered, x: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """Record module ``m``'s per-sample statistics into ``st``; return the batch's (grad_W, grad_b) (grad_b when
    the module has a bias)."""
    xs, gs = st.prepare(x), st.prepare(g)  # [B, T, d], pads zeroed
    per = torch.bmm(gs.transpose(1, 2), xs)  # G_i [B, d_out, d_in]
    sq = torch.linalg.vector_norm(per.flatten(1), dim=1).float().square()  # no [B, d_out, d_in] temporary
    grad_w = per.sum(0)
    grad_b = None
    if bias:
        per_b = gs.sum(1)
        if m.bias is not None:
            sq = sq + torch.linalg.vector_norm(per_b.float(), dim=1).square()
        grad_b = per_b.sum(0)
    if st.padded and x.dim() == 3 and x.shape[1] == st.mask.shape[1]:  # pads' part of the step's gradient
        pad = st.mask == 0
        gp, xp = g[pad], x[pad]
        grad_w = grad_w + gp.transpose(0, 1) @ xp
        grad_b = None if grad_b is None else grad_b + gp.sum(0)
    st.add(m.report, sq)
    if st.projector is not None:
        st.projector.project_linear(m.weight, xs, gs, st.features)
    return grad_w, grad_b


class FusedLinear(torch.autograd.Function):
    """y = x W^T + b; backward: grad_x = g W, and (grad_W, grad_b) from ``fused_grads``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, st: MicroBatch, m: Covered) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.st, ctx.m, ctx.bias = st, m, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        grad_w, grad_b = fused_grads(ctx.st, ctx.m, x, g, ctx.bias)
        grad_b = grad_b.to(weight.dtype) if grad_b is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w.to(weight.dtype), grad_b, None, None
