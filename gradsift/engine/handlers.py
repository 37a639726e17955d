"""Module handlers: how the per-sample gradient engine covers each kind of trainable module.

A handler says what a covered module's forward hook keeps (its input, or its token ids) and how that,
with the gradient of the module's output, becomes the per-sample squared norms, materialised
per-sample gradients and projected features of the module's parameters. The math is in
gradsift/engine/gradients.py, the batched kernels in gradsift/engine/kernels.py.

Handlers are found by structure, never by class name (``handler_for``; ``HANDLERS`` is the registry,
tried in order, and ``register_handler`` adds one):

* ``LinearHandler``: ``isinstance(module, nn.Linear)`` (also peft's LoRA A/B layers).
* ``Conv1DHandler``: transformers' ``Conv1D`` (GPT-2), a Linear whose weight is stored [d_in, d_out].
* ``EmbeddingHandler``: ``isinstance(module, nn.Embedding)`` (not ``max_norm`` / ``scale_grad_by_freq``) whose
  forward is y = c * W[ids] for a constant c, found by a probe (c = sqrt(d) for Gemma's scaled embeddings).
* ``NormHandler``: any module whose only parameters are a vector ``weight`` [d] (and optionally a
  ``bias`` [d]), with an epsilon attribute (``eps``, ``variance_epsilon`` or ``epsilon``), whose forward
  is one of y = w * x / rms(x) (Llama, Mistral, Qwen, Phi-3, T5, torch's nn.RMSNorm),
  y = (1 + w) * x / rms(x) (Gemma) or y = (x - mean) / std * w (nn.LayerNorm, GPT-2, BERT), each with
  + b when there is a bias. The formula is found by calling the module's own forward on random inputs
  and parameters (``torch.func.functional_call``, the module is not changed) and comparing with each
  candidate; the second probe input is small enough that the epsilon matters, so a wrong epsilon
  attribute fails the probe too.

A module with trainable parameters that no handler takes raises ``UnsupportedModuleError`` naming it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from gradsift.engine import kernels as em

if TYPE_CHECKING:
    from gradsift.engine.state import Covered, MicroBatch

EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
NORM_FORMULAS = {
    "rms": "y = w * x / rms(x)",
    "rms_offset": "y = (1 + w) * x / rms(x)",
    "layer": "y = (x - mean(x)) / std(x) * w",
}
PROBE_TOL = 1e-4


class UnsupportedModuleError(NotImplementedError):
    """A trainable module the engine has no handler for."""


class Handler:
    """Base class. A handler instance is made per covered module (by ``match``) and is stateless."""

    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    matrix: ClassVar[bool] = False  # weight is projected as a LoGra matrix block (else: vector block)
    transposed: ClassVar[bool] = False  # weight stored [d_in, d_out] rather than [d_out, d_in]

    @classmethod
    def match(cls, module: nn.Module) -> Handler | None:
        raise NotImplementedError

    def capture(self, st: MicroBatch, x: Tensor) -> object:
        """What the forward hook keeps of the module's first input (default: the shared masked input)."""
        return st.shared_input(x)

    def backward(self, st: MicroBatch, m: Covered, g: Tensor) -> None:
        """Accumulate the module's statistics from its output gradient g [B, T, d_out] (pads zeroed)."""
        raise NotImplementedError


class LinearHandler(Handler):
    kind = "linear"
    description = "nn.Linear"
    matrix = True

    @classmethod
    def match(cls, module: nn.Module) -> Handler | None:
        return cls() if isinstance(module, nn.Linear) else None

    def backward(self, st: MicroBatch, m: Covered, g: Tensor) -> None:
        x = m.saved.x
        b, t, d_in = x.shape
        d_out = g.shape[-1]
        if m.tied_to is not None:  # LM head sharing the embedding table: keep what the cross term needs
            ids = m.tied_to.saved
            st.tied[m.tied_to.name] = (g.gather(2, ids[:, None, :].expand(-1, t, -1)), x)
        sq, ghost_bias = None, False
        if m.weight is not None:
            if st.materialise(t, d_in, d_out) or st.flat is not None:
                sq = torch.zeros(b, device=g.device)
                for i, j in em.chunks(b, d_in * d_out):
                    gm = em.materialise(x, g, i, j)
                    sq[i:j] = gm.pow(2).sum(dim=(1, 2))
                    if st.flat is not None:
                        st.flat_rows(m.weight, i, j, gm.transpose(1, 2) if self.transposed else gm)
            else:  # the bias's norm is folded into the ghost product (no sum over T here)
                ghost_bias = m.bias is not None
                sq = st.ghost(m.saved, g, ghost_bias)
        if m.bias is not None and not ghost_bias:
            gb = g.float().sum(dim=1)
            sq = gb.pow(2).sum(dim=1) if sq is None else sq + gb.pow(2).sum(dim=1)
            if st.flat is not None:
                st.flat_add(m.bias, gb)
            if st.projector is not None and m.weight is None:
                st.projector.project_vector(m.bias, gb, st.features)
        if sq is not None:
            st.add(m.report, sq)
        if m.nuclear:
            st.nuclear[m.name] = em.nuclear(x, g)
        if st.projector is not None and m.weight is not None:  # a tied head adds into the embedding block
            st.projector.project_linear(m.weight, x, g, st.features)


class Conv1DHandler(LinearHandler):
    """transformers' Conv1D: y = x W + b with W [d_in, d_out]; the per-sample gradient is G^T."""

    kind = "conv1d"
    description = "transformers Conv1D (GPT-2)"
    transposed = True

    @classmethod
    def match(cls, module: nn.Module) -> Handler | None:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - transformers is a dependency
            return None
        return cls() if isinstance(module, Conv1D) else None


class EmbeddingHandler(Handler):
    kind = "embedding"
    description = "nn.Embedding"
    matrix = True

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    @classmethod
    def match(cls, module: nn.Module) -> Handler | None:
        if isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
            scale = embedding_scale(module)
            return None if scale is None else cls(scale)
        return None

    def capture(self, st: MicroBatch, x: Tensor) -> object:
        return x  # the token ids

    def backward(self, st: MicroBatch, m: Covered, e: Tensor) -> None:
        ids = m.saved
        if self.scale != 1.0:  # y = c * W[ids]: the table's gradient is onehot^T (c e)
            e = e * self.scale
        pad = m.module.padding_idx
        if pad is not None:  # the padding row gets no gradient
            e = e * (ids != pad)[..., None].to(e.dtype)
        st.add(m.report, em.embedding_sq_norm(ids, e))
        if m.name in st.tied:
            gather, hx = st.tied.pop(m.name)
            st.cross[m.report] = em.tied_cross(gather, hx, e)
        if st.flat is not None:
            st.flat_add(m.weight, em.embedding_materialise(ids, e, m.module.num_embeddings))
        if st.projector is not None:
            st.projector.project_embedding(m.weight, ids, e, st.features)


def embedding_scale(module: nn.Embedding) -> float | None:
    """The constant c of an embedding whose forward is y = c * W[ids] (1 for nn.Embedding; sqrt(d) for
    transformers 5's scaled word embeddings of Gemma), probed on the module's own table; None otherwise."""
    ids = torch.arange(min(module.num_embeddings, 16), device=module.weight.device)
    with torch.no_grad():
        try:
            y = module(ids)
        except Exception:  # noqa: BLE001 - any failure means "not an embedding we understand"
            return None
        ref = module.weight[ids]
        if not isinstance(y, Tensor) or y.shape != ref.shape:
            return None
        y, ref = y.double(), ref.double()
        scale = float((y * ref).sum() / (ref * ref).sum().clamp_min(1e-300))
        ok = (y - scale * ref).abs().max() <= PROBE_TOL * y.abs().max().clamp_min(1e-30)
    return (1.0 if abs(scale - 1.0) < 1e-6 else scale) if ok else None


def norm_eps(module: nn.Module) -> tuple[bool, float | None]:
    """(has an epsilon attribute, its value); None means torch's default, finfo(dtype).eps (nn.RMSNorm)."""
    for attr in EPS_ATTRS:
        if hasattr(module, attr):
            v = getattr(module, attr)
            if v is None or isinstance(v, (int, float)):
                return True, None if v is None else float(v)
    return False, None


def _norm_like(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) when the module has exactly a vector weight and optionally a matching bias."""
    params = dict(module.named_parameters())
    w = params.get("weight")
    if w is None or w.dim() != 1 or set(params) - {"weight", "bias"}:
        return None
    b = params.get("bias")
    if b is not None and b.shape != w.shape:
        return None
    return w, b


def _candidates(x: Tensor, w: Tensor, b: Tensor | None, eps: float) -> dict[str, Tensor]:
    xr = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xc = x - x.mean(-1, keepdim=True)
    xl = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    out = {"rms": w * xr, "rms_offset": (1 + w) * xr, "layer": w * xl}
    return {k: v if b is None else v + b for k, v in out.items()}


def probe_norm(module: nn.Module) -> str | None:
    """Which of NORM_FORMULAS the module's forward computes (see the module docstring), or None."""
    wb = _norm_like(module)
    has_eps, eps = norm_eps(module)
    if wb is None or not has_eps:
        return None
    w0, b0 = wb
    d, dev = w0.shape[0], w0.device
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dev)

    w = rand(d)
    params = {"weight": w} | ({} if b0 is None else {"bias": rand(d)})
    found: set[str] | None = None
    for scale in (1.0, 10 * math.sqrt(eps)):  # the second: eps is ~1% of mean(x^2)
        x = (rand(2, 3, d) + 0.5) * scale
        try:
            with torch.no_grad():
                y = torch.func.functional_call(module, params, (x,))
        except Exception:  # noqa: BLE001 - any failure means "not a norm we understand"
            return None
        if not isinstance(y, Tensor) or y.shape != x.shape:
            return None
        bias = None if b0 is None else params["bias"].double()
        want = _candidates(x.double(), w.double(), bias, eps)
        ok = {k for k, v in want.items() if (y.double() - v).abs().max() <= PROBE_TOL * v.abs().max()}
        found = ok if found is None else found & ok
    return next(iter(found)) if found and len(found) == 1 else None


class NormHandler(Handler):
    kind = "norm"
    description = "RMSNorm (" + NORM_FORMULAS["rms"] + " or " + NORM_FORMULAS["rms_offset"] + ") and LayerNorm"

    def __init__(self, formula: str, eps: float | None):
        self.formula, self.eps = formula, eps

    @classmethod
    def match(cls, module: nn.Module) -> Handler | None:
        formula = probe_norm(module)
        return None if formula is None else cls(formula, norm_eps(module)[1])

    def xhat(self, x: Tensor) -> Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if self.formula == "layer":
            return em.layer_norm_xhat(x, (x.shape[-1],), eps)
        # Llama-style casts x/rms(x) back to the input dtype before the weight; Gemma multiplies in float32
        return em.rms_xhat(x, eps, cast=self.formula == "rms")

    def backward(self, st: MicroBatch, m: Covered, g: Tensor) -> None:
        vecs, gf = [], g.float()
        if m.weight:  # xhat is a fresh tensor: multiplied in place
            vecs.append((m.weight, self.xhat(m.saved.x).float().mul_(gf).sum(dim=1)))
        if m.bias:
            vecs.append((m.bias, gf.sum(dim=1)))
        for name, v in vecs:
            st.add(m.report, v.pow(2).sum(dim=1))
            if st.flat is not None:
                st.flat_add(name, v)
            if st.projector is not None:
                st.projector.project_vector(name, v, st.features)


HANDLERS: list[type[Handler]] = [LinearHandler, Conv1DHandler, EmbeddingHandler, NormHandler]


def register_handler(handler: type[Handler], first: bool = True) -> None:
    """Add a handler to the registry (by default tried before the built-in ones)."""
    if handler not in HANDLERS:
        HANDLERS.insert(0 if first else len(HANDLERS), handler)


def supported() -> str:
    return ", ".join(h.description for h in HANDLERS)


def handler_for(name: str, module: nn.Module, trainable: list[str]) -> Handler:
    """The handler of ``module`` (qualified name ``name``), whose own trainable parameters are ``trainable``."""
    handler = None
    if not set(trainable) - {"weight", "bias"}:
        handler = next((h for cls in HANDLERS if (h := cls.match(module)) is not None), None)
    if handler is not None:
        return handler
    hint = ""
    if _norm_like(module) is not None and norm_eps(module)[0]:
        hint = (
            f" It looks like a normalisation layer (eps={norm_eps(module)[1]}), but its forward, probed on random "
            f"inputs, matches none of: {'; '.join(NORM_FORMULAS.values())} (each + b with a bias)."
        )
    raise UnsupportedModuleError(
        f"trainable parameters {trainable} of module {name!r} ({type(module).__module__}.{type(module).__qualname__}) "
        f"are not supported by the per-sample gradient engine.{hint} Supported module kinds: {supported()}. To leave "
        "it out, freeze it (param.requires_grad_(False) on its parameters) or use EngineConfig(parameters='lora'); "
        "to support it, add a handler with gradsift.engine.handlers.register_handler."
    )
