"""One micro-batch of the per-sample gradient engine: the hooks and the accumulators they write into.

``PerSampleGradients`` (gradsift/engine/gradients.py) registers ``MicroBatch.forward_hook`` on every
covered module; the hook keeps what the module's handler (gradsift/engine/handlers.py) needs and
attaches a tensor hook to the module's output, whose gradient goes to the handler's ``backward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradsift.engine import kernels as em
from gradsift.engine.handlers import Handler
from gradsift.engine.projection import GradientProjector


@dataclass
class SampleGrads:
    """Per-sample results, float32 CPU tensors with B rows."""

    loss: Tensor
    grad_norm: Tensor
    layer_norms: dict[str, Tensor] = field(default_factory=dict)
    nuclear: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    features: Tensor | None = None
    flat: Tensor | None = None  # [B, P] materialised gradients, laid out as PerSampleGradients.param_names

    @staticmethod
    def cat(parts: list[SampleGrads]) -> SampleGrads:
        def opt(xs):
            return None if xs[0] is None else torch.cat(xs)

        p0 = parts[0]
        return SampleGrads(
            loss=torch.cat([p.loss for p in parts]),
            grad_norm=torch.cat([p.grad_norm for p in parts]),
            layer_norms={k: torch.cat([p.layer_norms[k] for p in parts]) for k in p0.layer_norms},
            nuclear={
                k: (torch.cat([p.nuclear[k][0] for p in parts]), torch.cat([p.nuclear[k][1] for p in parts]))
                for k in p0.nuclear
            },
            features=opt([p.features for p in parts]),
            flat=opt([p.flat for p in parts]),
        )


@dataclass(eq=False)
class Covered:
    """A module the engine covers, with the names of its trainable parameters it reports."""

    name: str
    module: nn.Module
    handler: Handler
    weight: str | None
    bias: str | None
    report: str  # layer_norms key the squared norm is added to
    tied_to: Covered | None = None  # for an LM head sharing the embedding weight: the embedding
    nuclear: bool = False
    saved: object = None  # what the forward hook kept for this pass (SharedInput, or token ids)


class SharedInput:
    """An input tensor shared by several modules (q/k/v): masked once, Gram computed once (``em.gram_blocks``).

    ``acc`` sums the output-gradient Grams of the modules reading it when only the total norm is wanted:
    sum_m <Gx, Gg_m> = <Gx, sum_m Gg_m>, one in-place product per module and one reduction per input; keyed
    by whether the modules have a bias (folded into the product, ``em.ghost_blocks``)."""

    def __init__(self, x: Tensor):
        self.x = x
        self._gram: list[Tensor] | None = None
        self.acc: dict[bool, list[Tensor]] = {}

    def gram(self) -> list[Tensor]:
        if self._gram is None:
            self._gram = em.gram_blocks(self.x)
        return self._gram


class MicroBatch:
    """Accumulators of one micro-batch; hooks write into them."""

    def __init__(
        self,
        mask: Tensor,
        feature_dim: int,
        num_params: int,
        offsets: dict[str, tuple[int, int]],
        projector: GradientProjector | None,
        strategy: str,
        flat: bool,
        layer_stats: bool = True,
    ):
        b = mask.shape[0]
        dev = mask.device
        self.mask = mask
        self.padded = not bool(mask.all())
        self.offsets, self.projector, self.strategy = offsets, projector, strategy
        self.sq: dict[str, Tensor] = {}
        self.cross: dict[str, Tensor] = {}
        self.nuclear: dict[str, tuple[Tensor, Tensor]] = {}
        self.features = torch.zeros(b, feature_dim, device=dev) if projector is not None else None
        self.flat = torch.zeros(b, num_params, device=dev) if flat else None
        self.leaves: list[tuple[Covered, Tensor]] = []
        self.tied: dict[str, tuple[Tensor, Tensor]] = {}
        self._last: tuple[Tensor, SharedInput] | None = None
        self.layer_stats = layer_stats
        self._open: SharedInput | None = None  # the input whose summed Grams are not yet reduced (no layer_stats)
        self._ghost_total: Tensor | None = None  # the reduced ones

    # -- inputs and gradients as the handlers see them -----------------------------------------------
    def prepare(self, t: Tensor) -> Tensor:
        """[B, T, d] with pad positions zeroed ([B, d] -> [B, 1, d]; more dims folded into T, unmasked)."""
        if t.dim() == 3 and self.padded and t.shape[1] == self.mask.shape[1]:
            return t * self.mask[:, :, None].to(t.dtype)
        return t if t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])

    def shared_input(self, x: Tensor) -> SharedInput:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        holder = SharedInput(self.prepare(x.detach()))
        self._last = (x, holder)
        return holder

    def materialise(self, t: int, d_in: int, d_out: int) -> bool:
        """Whether a matrix gradient is materialised (T d_in d_out multiply-adds, fewer than the ghost norm's two
        Grams, or forced)."""
        ghost = em.gram_products(t, d_in) + em.gram_products(t, d_out)
        return self.strategy == "materialise" or (self.strategy == "auto" and t * d_in * d_out < ghost)

    # -- accumulators ---------------------------------------------------------------------------------
    def ghost(self, holder: SharedInput, g: Tensor, bias: bool) -> Tensor | None:
        """The ghost squared norm (with ``bias``: of weight and bias) of the module reading ``holder`` with output
        gradient g, or None when it was summed into ``holder.acc`` (no layer stats: only the total is
        reported, see ``finish``). The modules sharing an input get their gradients one after another (q/k/v),
        so an input's sum is reduced as soon as another input's module comes, while its Grams are in cache."""
        if self.layer_stats:
            return em.ghost_blocks(holder.gram(), em.gram_blocks(g), bias)
        if holder is not self._open:
            self._reduce_open()
            self._open = holder
        acc = holder.acc.get(bias)
        if acc is None:
            holder.acc[bias] = em.gram_blocks(g)
        else:
            em.gram_blocks(g, acc)
        return None

    def _reduce_open(self) -> None:
        """Add <Gx, sum_m Gg_m> of the open input to the total and free its sums (an input read again later
        starts new ones)."""
        holder, self._open = self._open, None
        if holder is None:
            return
        for bias, gg in holder.acc.items():
            v = em.ghost_blocks(holder.gram(), gg, bias)
            self._ghost_total = v if self._ghost_total is None else self._ghost_total + v
        holder.acc = {}

    def add(self, key: str, v: Tensor) -> None:
        self.sq[key] = self.sq[key] + v if key in self.sq else v

    def flat_add(self, name: str, g: Tensor) -> None:
        start, n = self.offsets[name]
        self.flat[:, start : start + n] += g.reshape(g.shape[0], -1).float()

    def flat_rows(self, name: str, i: int, j: int, g: Tensor) -> None:
        """Add per-sample gradients of samples i:j of parameter ``name``."""
        start, n = self.offsets[name]
        self.flat[i:j, start : start + n] += g.reshape(j - i, -1)

    # -- hooks ----------------------------------------------------------------------------------------
    def forward_hook(self, m: Covered):
        def hook(mod, args, out):
            if m.saved is not None:
                raise NotImplementedError(f"{m.name} is called more than once per forward pass")
            m.saved = m.handler.capture(self, args[0])
            if not out.requires_grad:
                out = out.detach().requires_grad_()
                self.leaves.append((m, out))
                return out
            out.register_hook(lambda g: self.on_grad(m, g))
            return None

        return hook

    def on_grad(self, m: Covered, g: Tensor) -> None:
        with torch.no_grad():
            m.handler.backward(self, m, self.prepare(g))
            m.saved = None
        return None

    def finish(self, loss: Tensor, module_names: list[str], layer_stats: bool) -> SampleGrads:
        sq = dict(self.sq)
        for k, c in self.cross.items():
            sq[k] = sq[k] + 2 * c
        zero = torch.zeros_like(loss, dtype=torch.float32)
        total = sum(sq.values(), zero)
        self._reduce_open()
        if self._ghost_total is not None:
            total = total + self._ghost_total
        # a module whose output never got a gradient (it does not reach the loss) has zero gradient
        layer = {k: sq.get(k, zero).clamp_min(0).sqrt().cpu() for k in module_names} if layer_stats else {}
        return SampleGrads(
            loss=loss.float().cpu(),
            grad_norm=total.clamp_min(0).sqrt().cpu(),
            layer_norms=layer,
            nuclear={k: (a.cpu(), r.cpu()) for k, (a, r) in self.nuclear.items()},
            features=None if self.features is None else self.features.cpu(),
            flat=None if self.flat is None else self.flat.cpu(),
        )
