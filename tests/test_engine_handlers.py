"""Module handlers of the per-sample gradient engine: other architectures against autograd, norm detection
by probing, and the error for a trainable module no handler takes."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine import check, make_batch, reference
from torch import nn

from gradsift.engine import handlers as hd
from gradsift.engine.gradients import PerSampleGradients, UnsupportedModuleError
from gradsift.models.loading import LlamaShape, build_llama
from gradsift.schemas.engine import EngineConfig

REL = 1e-5


def _randomise_norms(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _against_autograd(model, batch, strategies=("ghost", "materialise"), feature_dim=256):
    for strategy in strategies:
        eng = PerSampleGradients(model, EngineConfig(feature_dim=feature_dim), strategy=strategy)
        assert eng.num_params == sum(p.numel() for p in model.parameters())
        res = eng.compute(batch, flat_grads=True)
        check(res, reference(model, batch, eng), tol=REL)
        proj = eng.projector.project_flat(res.flat, eng.param_names, eng.param_shapes)
        assert torch.allclose(proj, res.features, rtol=1e-4, atol=1e-5 * res.features.abs().max().item())
    return eng, res


@pytest.fixture(scope="module")
def gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return _randomise_norms(GemmaForCausalLM(cfg), seed=1)


def test_gemma_against_autograd(gemma):
    # Gemma: y = (1 + w) * x / rms(x) norms (GemmaRMSNorm, not a Llama class), scaled and tied embeddings
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight
    eng, res = _against_autograd(gemma, make_batch([12, 7, 9, 4], prompt=3, seed=2))
    norms = [m for m in eng.mods if m.handler.kind == "norm"]
    assert len(norms) == 5 and {m.handler.formula for m in norms} == {"rms_offset"}
    assert "model.layers.1.post_attention_layernorm" in res.layer_norms and "lm_head" not in res.layer_norms


def test_gpt2_conv1d_layernorm_against_autograd():
    # GPT-2: transformers Conv1D (weight stored [d_in, d_out]) with biases, nn.LayerNorm, position embeddings
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=260, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48)
    torch.manual_seed(3)
    model = _randomise_norms(GPT2LMHeadModel(cfg), seed=4)
    eng, res = _against_autograd(model, make_batch([11, 6, 9], prompt=2, seed=5))
    kinds = {m.name: m.handler.kind for m in eng.mods}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["transformer.h.1.ln_2"] == "norm"
    assert kinds["transformer.wpe"] == "embedding"
    # nuclear norms of a Conv1D: those of its [d_in, d_out] gradient
    eng = PerSampleGradients(model, EngineConfig(feature_dim=0, nuclear_modules=["attn.c_proj"]))
    batch = make_batch([8, 5], seed=6)
    nuc = eng.compute(batch).nuclear["transformer.h.0.attn.c_proj"][0]
    flat = eng.compute(batch, flat_grads=True).flat
    start = 0
    for name, shape in zip(eng.param_names, eng.param_shapes, strict=True):
        if name == "transformer.h.0.attn.c_proj.weight":
            break
        start += torch.Size(shape).numel()
    g = flat[:, start : start + torch.Size(shape).numel()].view(-1, *shape)
    torch.testing.assert_close(nuc, torch.linalg.svdvals(g).sum(1), rtol=1e-4, atol=0)


def test_qwen3_per_head_norms_against_autograd():
    # Qwen3: q_norm / k_norm see per-head inputs [B, T, heads, head_dim]
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(7)
    model = _randomise_norms(Qwen3ForCausalLM(cfg), seed=8)
    eng, _ = _against_autograd(model, make_batch([10, 4, 8, 8], prompt=2, seed=9), strategies=("auto",))
    assert "model.layers.0.self_attn.q_norm" in eng.module_names


class _Llama(nn.Module):  # the Llama formula, not a transformers class
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


class _WrongEps(_Llama):
    def forward(self, x):  # says 1e-6, uses 1e-3
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3)


class _Gate(nn.Module):  # weight [d] and an eps, but not a norm
    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize(
    "module, formula",
    [
        (_Llama(16), "rms"),
        (nn.RMSNorm(16), "rms"),
        (nn.RMSNorm(16, eps=1e-5), "rms"),
        (nn.LayerNorm(16), "layer"),
        (nn.LayerNorm(16, bias=False), "layer"),
        (_WrongEps(16), None),
        (_Gate(16), None),
        (nn.Linear(16, 16), None),
    ],
)
def test_probe_norm(module, formula):
    assert hd.probe_norm(module) == formula


def test_probe_norm_transformers_classes(gemma):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    assert hd.probe_norm(GemmaRMSNorm(16)) == "rms_offset"
    for cls in (LlamaRMSNorm, Phi3RMSNorm, T5LayerNorm):
        assert hd.probe_norm(cls(16)) == "rms", cls
    assert isinstance(hd.handler_for("n", GemmaRMSNorm(16), ["weight"]), hd.NormHandler)


def test_unsupported_module_names_it_and_freezing_excludes_it():
    model = build_llama(LlamaShape(hidden=32, layers=1, heads=4, intermediate=64, vocab=260), seed=10)
    model.model.layers[0].post_attention_layernorm = _Gate(32)
    with pytest.raises(UnsupportedModuleError) as err:
        PerSampleGradients(model, EngineConfig(feature_dim=0))
    msg = str(err.value)
    for part in ("'model.layers.0.post_attention_layernorm'", "_Gate", "['weight']", "looks like a normalisation"):
        assert part in msg, msg
    for part in ("nn.Linear", "nn.Embedding", "RMSNorm", "LayerNorm", "requires_grad_(False)", "parameters='lora'"):
        assert part in msg, msg
    assert isinstance(err.value, NotImplementedError)
    # frozen, it is left out, and the rest still matches autograd
    model.model.layers[0].post_attention_layernorm.weight.requires_grad_(False)
    eng = PerSampleGradients(model, EngineConfig(feature_dim=64))
    assert "model.layers.0.post_attention_layernorm" not in eng.module_names
    batch = make_batch([9, 5], seed=11)
    check(eng.compute(batch, flat_grads=True), reference(model, batch, eng), tol=REL)


def test_unsupported_module_kind_is_named():
    model = copy.deepcopy(build_llama(LlamaShape(hidden=16, layers=1, heads=2, intermediate=32), seed=12))
    model.model.layers[0].mlp.act_fn = nn.PReLU()
    with pytest.raises(UnsupportedModuleError, match=r"'model\.layers\.0\.mlp\.act_fn' \(torch\.nn\..*PReLU\)"):
        PerSampleGradients(model, EngineConfig(feature_dim=0))


class _Scale(nn.Module):  # y = x * w: per-sample grad_w = sum_t g_t * x_t
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight


class _ScaleHandler(hd.Handler):
    kind, description = "scale", "elementwise scale (test)"

    @classmethod
    def match(cls, module):
        return cls() if isinstance(module, _Scale) else None

    def backward(self, st, m, g):
        v = (g.float() * m.saved.x.float()).sum(dim=1)
        st.add(m.report, v.pow(2).sum(dim=1))
        if st.flat is not None:
            st.flat_add(m.weight, v)
        if st.projector is not None:
            st.projector.project_vector(m.weight, v, st.features)


def test_register_handler(monkeypatch):
    monkeypatch.setattr(hd, "HANDLERS", list(hd.HANDLERS))
    hd.register_handler(_ScaleHandler)
    assert "elementwise scale (test)" in hd.supported()
    model = build_llama(LlamaShape(hidden=32, layers=1, heads=4, intermediate=64, vocab=260), seed=13)
    model.model.layers[0].mlp.down_proj = nn.Sequential(model.model.layers[0].mlp.down_proj, _Scale(32))
    eng = PerSampleGradients(model, EngineConfig(feature_dim=64))
    batch = make_batch([8, 6, 3], seed=14)
    check(eng.compute(batch, flat_grads=True), reference(model, batch, eng), tol=REL)


def test_embedding_padding_idx_gets_no_gradient():
    # build_llama's embedding has padding_idx=0 (the pad id); a pad id inside the text gets no gradient
    model = build_llama(LlamaShape(hidden=32, layers=1, heads=4, intermediate=64, vocab=260), seed=15)
    assert model.model.embed_tokens.padding_idx == 0
    batch = make_batch([10, 7], seed=16)
    batch.input_ids[0, [2, 5]] = 0
    batch.input_ids[1, 4] = 0
    _against_autograd(model, batch, strategies=("auto",))
