"""Per-sample gradient engine: loss, gradient norms, per-module norms, nuclear norms, projected features.

Math and sources
----------------
One batched forward and one backward per micro-batch (the per-example trick of Goodfellow 2015,
"Efficient Per-Example Gradient Computations"). The loss is total = sum_i loss_i, so the activation
gradients of sample i are exactly those of loss_i. Forward hooks keep each covered module's input x;
tensor hooks on its output receive the output gradient g. For a Linear layer the per-sample weight
gradient is G_i = sum_t g_t x_t^T and the bias gradient sum_t g_t. Its squared Frobenius norm is either
the "ghost" identity sum_{t,t'} (x_t.x_t')(g_t.g_t') (ghost clipping, Li et al. 2022, "Large Language
Models Can Be Strong Differentially Private Learners"), cost T^2 (d_in + d_out), or ||G_i||^2 after
materialising G_i, cost T d_in d_out; the engine picks the cheaper per layer (Bu et al. 2022,
"book-keeping": per-sample norms without the weight gradients). Inputs x sharing one tensor (q/k/v,
gate/up) share one Gram matrix.

No weight gradient is ever computed: during ``compute`` every parameter has requires_grad=False, every
nn.Embedding output is made a fresh leaf that requires grad, and torch.autograd.grad(total, leaves)
propagates only activation gradients. That is cheaper than a training step.

Other parameter kinds:
* nn.Embedding: G_i = sum_t onehot(id_t) e_t^T, ||G_i||^2 = sum_{t,t'} [id_t == id_t'] (e_t.e_t') (e: gradient
  of the embedding output). Covers BERT word/position/token-type embeddings.
* Tied embeddings (LM head shares the embedding weight): ||G_emb + G_head||^2 adds the cross term
  2 <G_emb, G_head> = 2 sum_{s,t} g_s[id_t] (h_s . e_t). Reported under the embedding module's name only.
* LlamaRMSNorm (and Mistral/Qwen2 RMSNorm): grad_w = sum_t g_t * xhat_t; nn.LayerNorm likewise, bias sum_t g_t.
* Nuclear norms (modules matching ``nuclear_modules``, weight only): svdvals in float32 of the T x T matrix
  R1 R2^T from QR of g^T and x^T (G has rank <= T); sigma1_ratio = sigma_1 / nuclear. Motivation: Li et al.
  2024, "What Happened in LLMs Layers when Trained for Fast vs. Slow Thinking: A Gradient Perspective".
* Projected features: LoGra (Choe et al. 2024, "What is Your Data Worth to GPT?"), see engine_projection.py.

Padding: pad positions (attention_mask 0) are zeroed in x and g, trailing all-pad columns are trimmed,
and causal LMs get position_ids = cumsum(mask) - 1, so a sample's numbers do not depend on its batch
(dropout must be off: the model is put in eval mode during compute). Anything trainable the engine
cannot handle (other module types, parameters shared other than embedding/LM head, modules called twice
per forward) raises an error rather than being left out. Precision: CPU float32; on CUDA with bfloat16
models the products run in bfloat16 and Gram matrices / norms are accumulated in float32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from gradsift.data.batching import Batch
from gradsift.engine import kernels as em
from gradsift.engine.projection import GradientProjector
from gradsift.models.adapter import per_sample_loss, task_of
from gradsift.schemas.engine import EngineConfig

Strategy = Literal["auto", "ghost", "materialise"]
_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.(.+)$")


def module_key(name: str) -> tuple[int, str]:
    """ "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj"); modules outside layers -> (-1, name)."""
    m = _LAYER_RE.search(name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


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


@dataclass
class _Mod:
    name: str
    module: nn.Module
    kind: str  # linear | embedding | rmsnorm | layernorm
    weight: str | None  # parameter names covered
    bias: str | None
    report: str  # layer_norms key the squared norm is added to
    tied_to: _Mod | None = None  # for an LM head sharing the embedding weight: the embedding
    nuclear: bool = False
    x: object = None  # per-pass input holder
    ids: Tensor | None = None


class _Input:
    """An input tensor shared by several modules (q/k/v): masked once, Gram computed once."""

    def __init__(self, x: Tensor):
        self.x = x
        self._gram: Tensor | None = None

    def gram(self) -> Tensor:
        if self._gram is None:
            self._gram = em.gram(self.x)
        return self._gram


class PerSampleGradients:
    """Per-sample gradient statistics of ``model`` without computing weight gradients.

    strategy: "auto" picks ghost or materialise per Linear by cost; "ghost"/"materialise" force one.
    """

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, strategy: Strategy = "auto"):
        self.model = model
        self.config = config or EngineConfig()
        self.strategy = strategy
        self.task = task_of(model.get_base_model() if hasattr(model, "get_base_model") else model)
        self.mods: list[_Mod] = []
        self._setup()
        self.projector: GradientProjector | None = None
        if self.config.feature_dim > 0:
            mats, vecs = [], []
            for m in self.mods:
                if m.kind in ("linear", "embedding") and m.tied_to is None:
                    w = self._params[m.weight]
                    mats.append((m.weight, m.bias, w.shape[0], w.shape[1]))
                elif m.kind in ("rmsnorm", "layernorm"):
                    vecs += [(n, self._params[n].numel()) for n in (m.weight, m.bias) if n]
            self.projector = GradientProjector(mats, vecs, self.config.feature_dim, self.config.projection_seed)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.config
        named = dict(self.model.named_parameters(remove_duplicate=False))
        if cfg.parameters == "lora":
            trainable = {n for n, p in named.items() if "lora_" in n and p.requires_grad}
        else:
            trainable = {n for n, p in named.items() if p.requires_grad}
        if not trainable:
            raise ValueError(f"no trainable parameters for parameters={cfg.parameters!r}")
        covered: dict[int, _Mod] = {}
        self._params: dict[str, nn.Parameter] = {}
        for name, mod in self.model.named_modules(remove_duplicate=False):
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if f"{name}.{n}" in trainable]
            if not own:
                continue
            kind = self._kind(mod)
            if kind is None or any(n not in ("weight", "bias") for n, _ in own):
                raise NotImplementedError(
                    f"trainable parameters of {name} ({type(mod).__name__}: {[n for n, _ in own]}) are not "
                    "supported by the per-sample gradient engine (supported: nn.Linear, nn.Embedding, "
                    "nn.LayerNorm, Llama-style RMSNorm)"
                )
            params = dict(own)
            entry = _Mod(name, mod, kind, None, None, name)
            w = params.get("weight")
            if w is not None and id(w) in covered:
                first = covered[id(w)]
                if not (first.kind == "embedding" and kind == "linear" and "bias" not in params):
                    raise NotImplementedError(f"{name} shares its weight with {first.name}: unsupported tie")
                entry.tied_to, entry.report, entry.weight = first, first.name, first.weight
            elif w is not None:
                entry.weight = f"{name}.weight"
                self._params[entry.weight] = w
                covered[id(w)] = entry
            if "bias" in params:
                entry.bias = f"{name}.bias"
                self._params[entry.bias] = params["bias"]
            entry.nuclear = kind == "linear" and any(name.endswith(s) for s in cfg.nuclear_modules)
            self.mods.append(entry)
        missing = trainable - {n for n in named if id(named[n]) in {id(p) for p in self._params.values()}}
        if missing:
            raise NotImplementedError(f"parameters not covered by the engine: {sorted(missing)[:10]}")
        for suffix in cfg.nuclear_modules:
            if not any(m.nuclear and m.name.endswith(suffix) for m in self.mods):
                raise ValueError(f"nuclear_modules entry {suffix!r} matches no covered nn.Linear module")
        self.param_names = list(self._params)
        self.param_shapes = [tuple(p.shape) for p in self._params.values()]
        self.num_params = sum(p.numel() for p in self._params.values())
        self._offsets, start = {}, 0
        for n, p in self._params.items():
            self._offsets[n] = (start, p.numel())
            start += p.numel()

    @staticmethod
    def _kind(mod: nn.Module) -> str | None:
        if isinstance(mod, nn.Linear):
            return "linear"
        if isinstance(mod, nn.Embedding):
            return "embedding"
        if isinstance(mod, nn.LayerNorm):
            return "layernorm"
        if type(mod).__name__ in _RMS_NORMS:
            return "rmsnorm"
        return None

    @property
    def module_names(self) -> list[str]:
        """layer_norms keys (one per covered module; a tied LM head reports under its embedding)."""
        return list(dict.fromkeys(m.report for m in self.mods))

    # ------------------------------------------------------------------ public API
    def compute(self, batch: Batch, flat_grads: bool = False) -> SampleGrads:
        """Per-sample statistics of ``batch``, in micro-batches (halved on CUDA out-of-memory)."""
        parts, i, mbs = [], 0, self.config.micro_batch_size
        n = batch.size
        while i < n:
            sub = Batch(batch.input_ids[i : i + mbs], batch.attention_mask[i : i + mbs], batch.labels[i : i + mbs])
            try:
                parts.append(self._compute_micro(sub, flat_grads))
            except torch.cuda.OutOfMemoryError:
                if mbs == 1:
                    raise
                mbs //= 2
                torch.cuda.empty_cache()
                continue
            i += sub.size
        return SampleGrads.cat(parts)

    def flat_grads(self, batch: Batch) -> Tensor:
        """Materialised per-sample gradients [B, num_params] (small parameter sets: LoRA, tiny models)."""
        return self.compute(batch, flat_grads=True).flat

    # ------------------------------------------------------------------ one micro-batch
    def _compute_micro(self, batch: Batch, flat: bool) -> SampleGrads:
        model = self.model
        dev = next(model.parameters()).device
        mask = batch.attention_mask
        keep = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
        batch = Batch(
            batch.input_ids[:, :keep],
            mask[:, :keep],
            batch.labels[..., :keep] if batch.labels.dim() == 2 else batch.labels,
        ).to(dev)
        b = batch.size
        st = _State(self, batch, flat, dev)
        req = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        handles = []
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for m in self.mods:
                handles.append(m.module.register_forward_hook(st.forward_hook(m)))
            covered = {id(m.module) for m in self.mods}
            for mod in model.modules():
                if isinstance(mod, nn.Embedding) and id(mod) not in covered:
                    handles.append(mod.register_forward_hook(st.leaf_hook))
            m_long = batch.attention_mask.long()
            pos = (m_long.cumsum(-1) - 1).clamp(min=0)
            with torch.enable_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
                loss = per_sample_loss(logits, batch.labels, self.task, self.config.loss_reduction)
                del logits
                leaves = [t for _, t in st.leaves]
                grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            for (m, t), g in zip(st.leaves, grads, strict=True):
                if m is not None:
                    st.on_grad(m, torch.zeros_like(t) if g is None else g)
        finally:
            for h in handles:
                h.remove()
            for p, r in req.items():
                p.requires_grad_(r)
            model.train(was_training)
            for m in self.mods:
                m.x = m.ids = None
            # The tensor hooks' closures hold ``st`` and live in the autograd graph, which ``st._last``
            # (a module input) keeps alive: a cycle through C++ that gc cannot collect, leaking the
            # micro-batch's activations and accumulators on every call. Break it.
            st._last, st.leaves = None, []
        return st.finish(loss.detach(), b)


class _State:
    """Accumulators of one micro-batch; hooks write into it."""

    def __init__(self, eng: PerSampleGradients, batch: Batch, flat: bool, dev: torch.device):
        self.eng, self.cfg = eng, eng.config
        b = batch.size
        self.mask = batch.attention_mask
        self.padded = not bool(self.mask.all())
        self.sq: dict[str, Tensor] = {}
        self.cross: dict[str, Tensor] = {}
        self.nuclear: dict[str, tuple[Tensor, Tensor]] = {}
        self.features = torch.zeros(b, self.cfg.feature_dim, device=dev) if eng.projector is not None else None
        self.flat = torch.zeros(b, eng.num_params, device=dev) if flat else None
        self.leaves: list[tuple[_Mod | None, Tensor]] = []
        self.tied: dict[str, tuple[Tensor, Tensor]] = {}
        self._last: tuple[Tensor, _Input] | None = None

    def _mask(self, t: Tensor) -> Tensor:
        if not self.padded or t.shape[1] != self.mask.shape[1]:
            return t
        return t * self.mask[:, :, None].to(t.dtype)

    def leaf_hook(self, mod, args, out):
        if out.requires_grad:
            return None
        out = out.detach().requires_grad_()
        self.leaves.append((None, out))
        return out

    def forward_hook(self, m: _Mod):
        def hook(mod, args, out):
            x = args[0]
            if m.x is not None:
                raise NotImplementedError(f"{m.name} is called more than once per forward pass")
            if m.kind == "embedding":
                m.x, m.ids = True, x
            elif self._last is not None and self._last[0] is x:
                m.x = self._last[1]
            else:
                holder = _Input(self._mask(x.detach() if x.dim() == 3 else x.detach()[:, None]))
                self._last = (x, holder)
                m.x = holder
            if not out.requires_grad:
                out = out.detach().requires_grad_()
                self.leaves.append((m, out))
                return out
            out.register_hook(lambda g: self.on_grad(m, g))
            return None

        return hook

    def _add(self, key: str, v: Tensor) -> None:
        self.sq[key] = self.sq[key] + v if key in self.sq else v

    def _flat_add(self, name: str, g: Tensor) -> None:
        start, n = self.eng._offsets[name]
        self.flat[:, start : start + n] += g.reshape(g.shape[0], -1).float()

    def on_grad(self, m: _Mod, g: Tensor) -> None:
        with torch.no_grad():
            g = self._mask(g if g.dim() == 3 else g[:, None])
            if m.kind == "linear":
                self._linear(m, g)
            elif m.kind == "embedding":
                self._embedding(m, g)
            else:
                self._norm(m, g)
        return None

    def _linear(self, m: _Mod, g: Tensor) -> None:
        x = m.x.x
        b, t, d_in = x.shape
        d_out = g.shape[-1]
        proj = self.eng.projector
        if m.tied_to is not None:  # LM head sharing the embedding table: keep what the cross term needs
            ids = m.tied_to.ids
            gather = g.gather(2, ids[:, None, :].expand(-1, t, -1))
            self.tied[m.tied_to.name] = (gather, x)
        mat = self.eng.strategy == "materialise" or (
            self.eng.strategy == "auto" and t * d_in * d_out < t * t * (d_in + d_out)
        )
        if mat or self.flat is not None:
            sq = torch.zeros(b, device=g.device)
            for i, j in em.chunks(b, d_in * d_out):
                gm = em.materialise(x, g, i, j)
                sq[i:j] = gm.pow(2).sum(dim=(1, 2))
                if self.flat is not None:
                    self.flat[i:j, self.eng._offsets[m.weight][0] :][:, : d_in * d_out] += gm.reshape(j - i, -1)
        else:
            sq = em.ghost_sq_norm(m.x.gram(), g)
        if m.bias is not None:
            sq = sq + em.bias_sq_norm(g)
            if self.flat is not None:
                self._flat_add(m.bias, g.sum(dim=1))
        self._add(m.report, sq)
        if m.nuclear:
            self.nuclear[m.name] = em.nuclear(x, g)
        if proj is not None:
            proj.project_linear(m.weight, x, g, self.features)
        m.x = None

    def _embedding(self, m: _Mod, e: Tensor) -> None:
        ids = m.ids
        self._add(m.report, em.embedding_sq_norm(ids, e))
        if m.name in self.tied:
            gather, hx = self.tied.pop(m.name)
            self.cross[m.report] = em.tied_cross(gather, hx, e)
        if self.flat is not None:
            self._flat_add(m.weight, em.embedding_materialise(ids, e, m.module.num_embeddings))
        if self.eng.projector is not None:
            self.eng.projector.project_embedding(m.weight, ids, e, self.features)

    def _norm(self, m: _Mod, g: Tensor) -> None:
        x = m.x.x
        mod = m.module
        if m.kind == "rmsnorm":
            xhat = em.rms_xhat(x, getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)))
        else:
            xhat = em.layer_norm_xhat(x, mod.normalized_shape, mod.eps)
        vecs = []
        if m.weight:
            vecs.append((m.weight, (g.float() * xhat.float()).sum(dim=1)))
        if m.bias:
            vecs.append((m.bias, g.float().sum(dim=1)))
        for name, v in vecs:
            self._add(m.report, v.pow(2).sum(dim=1))
            if self.flat is not None:
                self._flat_add(name, v)
            if self.eng.projector is not None:
                self.eng.projector.project_vector(name, v, self.features)
        m.x = None

    def finish(self, loss: Tensor, b: int) -> SampleGrads:
        sq = dict(self.sq)
        for k, c in self.cross.items():
            sq[k] = sq[k] + 2 * c
        total = sum(sq.values())
        layer = {k: sq[k].clamp_min(0).sqrt().cpu() for k in self.eng.module_names} if self.cfg.layer_stats else {}
        return SampleGrads(
            loss=loss.float().cpu(),
            grad_norm=total.clamp_min(0).sqrt().cpu(),
            layer_norms=layer,
            nuclear={k: (a.cpu(), r.cpu()) for k, (a, r) in self.nuclear.items()},
            features=None if self.features is None else self.features.cpu(),
            flat=None if self.flat is None else self.flat.cpu(),
        )
