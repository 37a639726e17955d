"""The per-sample gradient engine's hooks on a training step's own forward and backward.

``PerSampleGradients.compute`` runs its own forward and an activation-only backward; here the same module
handlers (gradsift/engine/handlers.py) and accumulators (``MicroBatch``, gradsift/engine/state.py) are hooked
into the user's training step instead: forward hooks keep each covered module's input, tensor hooks on its
output receive the output gradient that the step's ``loss.backward()`` computes anyway, and the ghost
identities (Li et al. 2022; Bu et al. 2022) turn them into per-sample squared norms and LoGra features (Choe et
al. 2024). No second backward and no per-sample weight-gradient copies.

Scale: the step's loss is some weighted sum sum_i c_i loss_i (a batch mean c_i = 1/B, a token mean over
the batch c_i = n_i / N, divided by the accumulation steps or by the Trainer's ``num_items_in_batch``), so the
output gradients the hooks see are c_i times those of loss_i. A tensor hook on the logits finds c_i exactly:
dL/dlogits_i = c_i * dloss_i/dlogits_i, where loss_i is the mean cross-entropy of the sample's n_i target tokens
(``per_sample_loss``, both adapters), so dloss_i/dlogits_t = (softmax - onehot)_t / n_i: the residual that the
visit's statistics (``dynamics.token_stats``) compute in the same softmax pass. Norms are divided by |c_i|,
features by c_i, so the record is || grad_w loss_i || whatever the reduction. Dropout is whatever the step uses
(the recorded gradient is the step's own).

A Linear whose per-sample gradients the engine would materialise runs as ``fused.FusedLinear`` during capture:
its backward builds them once and returns their sum as the weight gradient (the step's own grad_W matmul is
skipped), gradsift/capture/fused.py.

Position ids: a model that takes ``position_ids`` and is not given them gets its default (0..T-1) as one row per
sample, so that a position embedding's output gradient is per sample (a [1, T] default broadcasts over the batch).

Not supported: gradient checkpointing (modules run twice per step: the engine raises), ``torch.compile``d
models (the callback refuses them; capture the eager model), modules the engine does not cover (it names them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradsift.capture.fused import FusedLinear, fusable, fuse_now
from gradsift.capture.ids import ID_KEY, MISSING_HINT, MissingSampleIdsError
from gradsift.engine.gradients import PerSampleGradients
from gradsift.engine.state import Covered, MicroBatch
from gradsift.models.adapter import adapter
from gradsift.schemas.engine import EngineConfig
from gradsift.signals import dynamics as dyn


@dataclass
class MicroResult:
    """What one micro-batch's forward and backward recorded, [B] each (features [B, D]); CPU tensors."""

    ids: list[tuple[str, str]] | None  # None: the batch carried none (the plain-loop ``step`` gives them)
    stats: dict[str, Tensor]  # loss, pred, correct, margin, el2n, n_tokens, token_loss_max
    grad_norm: Tensor
    features: Tensor | None


class _Pending:
    def __init__(self, st: MicroBatch, ids):
        self.st, self.ids = st, ids
        self.logits: Tensor | None = None
        self.labels: Tensor | None = None
        self.scale: Tensor | None = None  # c_i, set by the logits' gradient hook
        self.stats: dict[str, Tensor] = {}  # the visit's statistics, computed there too
        self.fused: set[str] = set()  # modules that ran as FusedLinear in this forward


class StepCapture:
    """Hooks on ``model`` recording every training micro-batch (grad enabled, model in train mode).

    ``collect()`` returns the micro-batches whose backward has run since the last call."""

    def __init__(self, model: nn.Module, config: EngineConfig, require_ids: bool = True):
        self.require_ids = require_ids
        self.engine = PerSampleGradients(model, config)
        self.task = self.engine.task
        self.model = model
        self.pending: _Pending | None = None
        self.done: list[MicroResult] = []
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.takes_positions = "position_ids" in inspect.signature(base.forward).parameters
        self.handles = [m.module.register_forward_hook(self._module_hook(m)) for m in self.engine.mods]
        self.fusable = [m for m in self.engine.mods if fusable(m)]
        for m in self.fusable:
            m.module.forward = self._fused_forward(m)  # an instance attribute: close() deletes it
        self.handles.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._post, with_kwargs=True))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for m in self.fusable:
            del m.module.forward
        self.fusable = []

    # -- hooks ------------------------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        ids = kwargs.pop(ID_KEY, None)
        self._finish_pending()
        if not (torch.is_grad_enabled() and module.training):
            return args, kwargs
        if ids is None and self.require_ids:
            raise MissingSampleIdsError(f"a training batch has no sample ids ({ID_KEY}): " + MISSING_HINT)
        ref = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device) if mask is None else mask
        if self.takes_positions and kwargs.get("position_ids") is None:
            # the models' default position ids, one row per sample: a [1, T] default would make a position
            # embedding's output gradient the batch's sum, not per sample
            kwargs["position_ids"] = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
        e = self.engine
        st = MicroBatch(mask, e.config.feature_dim, e.num_params, e._offsets, e.projector, e.strategy, False)
        self.pending = _Pending(st, None if ids is None else list(ids))
        return args, kwargs

    def _module_hook(self, m: Covered):
        def hook(mod, args, out):
            if self.pending is None or not torch.is_grad_enabled() or m.name in self.pending.fused:
                return None
            return self.pending.st.forward_hook(m)(mod, args, out)

        return hook

    def _fused_forward(self, m: Covered):
        mod = m.module

        def forward(x: Tensor) -> Tensor:
            p = self.pending
            if p is None or not torch.is_grad_enabled() or not fuse_now(p.st, mod, x):
                return nn.Linear.forward(mod, x)
            if m.name in p.fused:
                raise NotImplementedError(f"{m.name} is called more than once per forward pass")
            p.fused.add(m.name)
            return FusedLinear.apply(x, mod.weight, mod.bias, p.st, m)

        return forward

    def _post(self, module, args, kwargs, out):
        p = self.pending
        if p is None:
            return None
        labels = kwargs.get("labels")
        if labels is None:
            raise ValueError("capture needs the labels in the model call (model(..., labels=...)) for per-sample losses")
        p.logits, p.labels = out.logits.detach(), labels
        out.logits.register_hook(lambda g: self._on_logits_grad(p, g))
        return None

    def _on_logits_grad(self, p: _Pending, g: Tensor) -> None:
        view = adapter(self.task).token_view
        flat, labels, owner = view(p.logits, p.labels)
        n = p.labels.shape[0]
        stats, tokens = dyn.token_stats(flat, labels, owner, n, self.task)
        r = tokens["residual"]
        n_tokens = torch.bincount(owner, minlength=n)
        per_sample = torch.zeros(2, n, device=r.device)  # sum_t <g_t, r_t>, sum_t |r_t|^2
        per_sample[0].index_add_(0, owner, (view(g, p.labels)[0] * r).sum(1))
        per_sample[1].index_add_(0, owner, tokens["el2n"].square())  # |r_t|^2
        gr, rr = per_sample
        c = n_tokens * gr / rr.clamp_min(torch.finfo(torch.float32).tiny)
        p.scale = torch.where(rr > 0, c, torch.ones_like(c))
        worst = torch.zeros(n, device=r.device).scatter_reduce_(0, owner, tokens["loss"], "amax")
        p.stats = stats | {"n_tokens": n_tokens, "token_loss_max": worst}

    # -- results ----------------------------------------------------------------------------------------
    def _finish_pending(self) -> None:
        p, self.pending = self.pending, None
        if p is None:
            return
        for m in self.engine.mods:
            m.saved = None
        p.st._last, p.st.leaves = None, []
        if p.scale is None:
            return  # a forward without backward (e.g. a step skipped for a non-finite loss): no visit
        res = p.st.finish(p.stats["loss"], self.engine.module_names, layer_stats=False)
        scale = p.scale.cpu()
        feats = None if res.features is None else res.features / scale[:, None]
        stats = {k: v.cpu() for k, v in p.stats.items()}
        self.done.append(MicroResult(p.ids, stats, res.grad_norm / scale.abs(), feats))

    def collect(self) -> list[MicroResult]:
        """Finish the last micro-batch (its backward must have run) and hand over everything recorded."""
        if self.pending is not None and self.pending.scale is None and self.pending.logits is not None:
            raise RuntimeError("capture: collect() before the micro-batch's backward; call it after loss.backward()")
        self._finish_pending()
        out, self.done = self.done, []
        return out
