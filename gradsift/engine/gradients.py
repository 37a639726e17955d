"""Per-sample gradient engine: loss, gradient norms, per-module norms, nuclear norms, projected features.

Math and sources
----------------
One batched forward and one backward per micro-batch (the per-example trick of Goodfellow 2015,
"Efficient Per-Example Gradient Computations"). The loss is total = sum_i loss_i, so the activation
gradients of sample i are exactly those of loss_i. Forward hooks keep each covered module's input x;
tensor hooks on its output receive the output gradient g. For a Linear layer the per-sample weight
gradient is G_i = sum_t g_t x_t^T and the bias gradient sum_t g_t. Its squared Frobenius norm is either
the "ghost" identity sum_{t,t'} (x_t.x_t')(g_t.g_t') (ghost clipping, Li et al. 2022, "Large Language
Models Can Be Strong Differentially Private Learners"), cost T^2 (d_in + d_out) (5/8 of it from T = 128 on:
the symmetric Grams' lower triangles in four column blocks, ``kernels.gram_blocks`` / ``gram_products``), or
||G_i||^2 after materialising G_i, cost T d_in d_out; the engine picks the cheaper per layer (Bu et al. 2022,
"book-keeping": per-sample norms without the weight gradients). Inputs x sharing one tensor (q/k/v,
gate/up) share one Gram matrix. On the ghost path a bias's ||sum_t g_t||^2 = sum_{t,t'} g_t.g_t' comes from
the same product: <x x^T + 1, g g^T>.

No weight gradient is ever computed: during ``compute`` every parameter has requires_grad=False, the output
of every covered module whose input carries no gradient (the embeddings; with ``parameters="block_linear"``
the first block's q/k/v and gate/up) is made a fresh leaf that requires grad, and
torch.autograd.grad(total, leaves) propagates only activation gradients, and none below those leaves (no
input gradient of the first covered modules). That is cheaper than a training step.

Other parameter kinds:
* nn.Embedding: G_i = sum_t onehot(id_t) e_t^T, ||G_i||^2 = sum_v ||sum_{t: id_t = v} e_t||^2 over the sample's
  distinct ids v (e: gradient of the embedding output). Covers BERT word/position/token-type embeddings.
* Tied embeddings (LM head shares the embedding weight): ||G_emb + G_head||^2 adds the cross term
  2 <G_emb, G_head> = 2 sum_{s,t} g_s[id_t] (h_s . e_t). Reported under the embedding module's name only.
* transformers Conv1D (GPT-2): a Linear with the weight stored transposed, same statistics.
* RMSNorm (y = w * xhat or Gemma's (1 + w) * xhat, xhat = x / rms(x)) and LayerNorm (xhat = (x - mean) / std,
  y = w * xhat + b): grad_w = sum_t g_t * xhat_t, grad_b = sum_t g_t.
* Nuclear norms (modules matching ``nuclear_modules``, weight only): svdvals in float32 of the T x T matrix
  R1 R2^T from QR of g^T and x^T (G has rank <= T); sigma1_ratio = sigma_1 / nuclear. Motivation: Li et al.
  2024, "What Happened in LLMs Layers when Trained for Fast vs. Slow Thinking: A Gradient Perspective".
* Projected features: LoGra (Choe et al. 2024, "What is Your Data Worth to GPT?"), see projection.py.

Which module gets which treatment is decided by structure in gradsift/engine/handlers.py (the handler
registry: isinstance for Linear/Conv1D/Embedding, a probe of the forward for norms); the hooks and
accumulators of one micro-batch are in gradsift/engine/state.py, the batched kernels in kernels.py.

Padding: pad positions (attention_mask 0) are zeroed in [B, T, d] inputs x and gradients g (pads get no
gradient anyway; inputs with more dimensions, e.g. per-head q/k norms, are only folded), trailing all-pad
columns are trimmed, and causal LMs get position_ids = cumsum(mask) - 1, so a sample's numbers do not
depend on its batch (dropout must be off: the model is put in eval mode during compute). Anything
trainable the engine cannot handle (other module types, parameters shared other than embedding/LM head,
modules called twice per forward) raises an error naming the module rather than being left out.
Precision: CPU float32; on CUDA with bfloat16 models the products run in bfloat16 and Gram matrices /
norms are accumulated in float32.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import Tensor, nn

from gradsift.data.batching import Batch
from gradsift.engine.handlers import UnsupportedModuleError, handler_for
from gradsift.engine.projection import GradientProjector
from gradsift.engine.state import Covered, MicroBatch, SampleGrads
from gradsift.models.adapter import per_sample_loss, task_of
from gradsift.schemas.engine import EngineConfig

__all__ = ["PerSampleGradients", "SampleGrads", "UnsupportedModuleError", "module_key"]

Strategy = Literal["auto", "ghost", "materialise"]
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.(.+)$")


def module_key(name: str) -> tuple[int, str]:
    """ "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj"); modules outside layers -> (-1, name)."""
    m = _LAYER_RE.search(name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


class PerSampleGradients:
    """Per-sample gradient statistics of ``model`` without computing weight gradients.

    strategy: "auto" picks ghost or materialise per Linear by cost; "ghost"/"materialise" force one.
    """

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, strategy: Strategy = "auto"):
        self.model = model
        self.config = config or EngineConfig()
        self.strategy = strategy
        self.task = task_of(model.get_base_model() if hasattr(model, "get_base_model") else model)
        self.mods: list[Covered] = []
        self._setup()
        self.projector: GradientProjector | None = None
        if self.config.feature_dim > 0:
            mats, vecs, transposed = [], [], set()
            for m in self.mods:
                if m.handler.matrix and m.weight is not None and m.tied_to is None:
                    w = self._params[m.weight]
                    rows, cols = (w.shape[1], w.shape[0]) if m.handler.transposed else (w.shape[0], w.shape[1])
                    mats.append((m.weight, m.bias, rows, cols))
                    if m.handler.transposed:
                        transposed.add(m.weight)
                elif m.tied_to is None:
                    vecs += [(n, self._params[n].numel()) for n in (m.weight, m.bias) if n]
            self.projector = GradientProjector(
                mats, vecs, self.config.feature_dim, self.config.projection_seed, transposed=transposed
            )

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.config
        named = dict(self.model.named_parameters(remove_duplicate=False))
        if cfg.parameters == "lora":
            trainable = {n for n, p in named.items() if "lora_" in n and p.requires_grad}
        elif cfg.parameters == "block_linear":
            trainable = {
                f"{name}.{n}"
                for name, mod in self.model.named_modules(remove_duplicate=False)
                if isinstance(mod, nn.Linear) and any(part.isdigit() for part in name.split("."))
                for n, p in mod.named_parameters(recurse=False)
                if p.requires_grad
            }
        else:
            trainable = {n for n, p in named.items() if p.requires_grad}
        if not trainable:
            raise ValueError(f"no trainable parameters for parameters={cfg.parameters!r}")
        covered: dict[int, Covered] = {}
        self._params: dict[str, nn.Parameter] = {}
        for name, mod in self.model.named_modules(remove_duplicate=False):
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if f"{name}.{n}" in trainable]
            if not own:
                continue
            handler = handler_for(name, mod, [n for n, _ in own])
            params = dict(own)
            entry = Covered(name, mod, handler, None, None, name)
            w = params.get("weight")
            if w is not None and id(w) in covered:
                first = covered[id(w)]
                if not (first.handler.kind == "embedding" and handler.kind == "linear" and "bias" not in params):
                    raise UnsupportedModuleError(
                        f"{name} ({type(mod).__name__}) shares its weight with {first.name}: unsupported tie "
                        "(only an nn.Linear LM head without bias tied to an nn.Embedding is)"
                    )
                entry.tied_to, entry.report, entry.weight = first, first.name, first.weight
            elif w is not None:
                entry.weight = f"{name}.weight"
                self._params[entry.weight] = w
                covered[id(w)] = entry
            if "bias" in params:
                entry.bias = f"{name}.bias"
                self._params[entry.bias] = params["bias"]
            entry.nuclear = handler.matrix and handler.kind != "embedding" and entry.weight is not None
            entry.nuclear = entry.nuclear and any(name.endswith(s) for s in cfg.nuclear_modules)
            self.mods.append(entry)
        ids = {id(p) for p in self._params.values()}
        missing = trainable - {n for n in named if id(named[n]) in ids}
        if missing:
            raise NotImplementedError(f"parameters not covered by the engine: {sorted(missing)[:10]}")
        for suffix in cfg.nuclear_modules:
            if not any(m.nuclear and m.name.endswith(suffix) for m in self.mods):
                raise ValueError(f"nuclear_modules entry {suffix!r} matches no covered Linear/Conv1D module")
        self.param_names = list(self._params)
        self.param_shapes = [tuple(p.shape) for p in self._params.values()]
        self.num_params = sum(p.numel() for p in self._params.values())
        self._offsets, start = {}, 0
        for n, p in self._params.items():
            self._offsets[n] = (start, p.numel())
            start += p.numel()

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
            types = None if batch.token_type_ids is None else batch.token_type_ids[i : i + mbs]
            sub = Batch(
                batch.input_ids[i : i + mbs], batch.attention_mask[i : i + mbs], batch.labels[i : i + mbs], types
            )
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
            None if batch.token_type_ids is None else batch.token_type_ids[:, :keep],
        ).to(dev)
        cfg = self.config
        st = MicroBatch(
            batch.attention_mask, cfg.feature_dim, self.num_params, self._offsets, self.projector, self.strategy, flat,
            cfg.layer_stats,
        )  # fmt: skip
        req = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        handles = []
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for m in self.mods:
                handles.append(m.module.register_forward_hook(st.forward_hook(m)))
            m_long = batch.attention_mask.long()
            pos = (m_long.cumsum(-1) - 1).clamp(min=0)
            with torch.enable_grad():
                types = {} if batch.token_type_ids is None else {"token_type_ids": batch.token_type_ids}
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos, **types
                ).logits
                loss = per_sample_loss(logits, batch.labels, self.task, cfg.loss_reduction)
                del logits
                leaves = [t for _, t in st.leaves]
                grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            for (m, t), g in zip(st.leaves, grads, strict=True):
                st.on_grad(m, torch.zeros_like(t) if g is None else g)
        finally:
            for h in handles:
                h.remove()
            for p, r in req.items():
                p.requires_grad_(r)
            model.train(was_training)
            for m in self.mods:
                m.saved = None
            # The tensor hooks' closures hold ``st`` and live in the autograd graph, which ``st._last``
            # (a module input) keeps alive: a cycle through C++ that gc cannot collect, leaking the
            # micro-batch's activations and accumulators on every call. Break it.
            st._last, st.leaves = None, []
        return st.finish(loss.detach(), self.module_names, cfg.layer_stats)
