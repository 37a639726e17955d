"""Per-sample gradient engine against plain autograd (one backward per sample, float64 reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsift.data.batching import IGNORE_INDEX, Batch
from gradsift.engine.gradients import PerSampleGradients, module_key
from gradsift.engine.kernels import (
    GRAM_SPLIT_MIN,
    embedding_materialise,
    embedding_sq_norm,
    ghost_blocks,
    gram_blocks,
    gram_products,
)
from gradsift.models.adapter import per_sample_loss
from gradsift.models.loading import LlamaShape, build_llama
from gradsift.schemas.engine import EngineConfig

REL = 1e-5


def make_batch(lengths, vocab=260, prompt=2, seed=0, total=None):
    gen = torch.Generator().manual_seed(seed)
    t = total or max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, :n] = 1
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[:, :prompt] = IGNORE_INDEX
    return Batch(ids, mask, labels)


def reference(model, batch, eng, reduction="mean", classification=False):
    """Per-sample loss, flat gradient (engine layout) and per-module norms by autograd, in float64."""
    ref = copy.deepcopy(model).double()
    params = dict(ref.named_parameters())
    out = {"loss": [], "flat": [], "layers": {k: [] for k in eng.module_names}}
    for i in range(batch.size):
        n = int(batch.attention_mask[i].sum())
        ref.zero_grad()
        ids = batch.input_ids[i : i + 1, :n]
        logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        labels = batch.labels[i : i + 1] if classification else batch.labels[i : i + 1, :n]
        task = "classification" if classification else "causal_lm"
        loss = per_sample_loss(logits.double(), labels, task, reduction)
        loss.sum().backward()
        out["loss"].append(loss.item())
        grads = {
            name: params[name].grad if params[name].grad is not None else torch.zeros_like(params[name])
            for name in eng.param_names
        }
        out["flat"].append(torch.cat([grads[name].reshape(-1) for name in eng.param_names]))
        for key in eng.module_names:
            sq = sum(grads[f"{key}.{s}"].pow(2).sum() for s in ("weight", "bias") if f"{key}.{s}" in grads)
            out["layers"][key].append(sq.sqrt().item())
    out["loss"] = torch.tensor(out["loss"], dtype=torch.float64)
    out["flat"] = torch.stack(out["flat"])
    out["layers"] = {k: torch.tensor(v, dtype=torch.float64) for k, v in out["layers"].items()}
    return out


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()


def check(res, ref, tol=REL):
    assert rel_err(res.loss, ref["loss"]) < tol
    assert rel_err(res.grad_norm, ref["flat"].norm(dim=1)) < tol
    assert set(res.layer_norms) == set(ref["layers"])
    for k, v in ref["layers"].items():
        assert rel_err(res.layer_norms[k], v) < tol, k
    if res.flat is not None:
        err = (res.flat.double() - ref["flat"]).norm(dim=1) / ref["flat"].norm(dim=1)
        assert err.max().item() < tol
    sq = sum(v.double().pow(2) for v in res.layer_norms.values())
    assert rel_err(sq.sqrt(), res.grad_norm) < tol


@pytest.fixture(scope="module")
def llama():
    return build_llama(LlamaShape(hidden=32, layers=2, heads=4, intermediate=64, vocab=260), seed=0)


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialise"])
def test_llama_untied_against_autograd(llama, strategy):
    batch = make_batch([12, 7, 9, 4], prompt=3)
    cfg = EngineConfig(nuclear_modules=["q_proj", "o_proj"], feature_dim=256)
    eng = PerSampleGradients(llama, cfg, strategy=strategy)
    res = eng.compute(batch, flat_grads=True)
    ref = reference(llama, batch, eng)
    check(res, ref)
    assert eng.num_params == sum(p.numel() for p in llama.parameters())
    assert "lm_head" in res.layer_norms and "model.embed_tokens" in res.layer_norms
    assert "model.layers.0.input_layernorm" in res.layer_norms and "model.norm" in res.layer_norms
    # nuclear norms against svdvals of the autograd gradient
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]:
        start = 0
        for pname, shape in zip(eng.param_names, eng.param_shapes, strict=True):
            if pname == f"{name}.weight":
                break
            start += torch.Size(shape).numel()
        g = ref["flat"][:, start : start + torch.Size(shape).numel()].view(-1, *shape)
        s = torch.linalg.svdvals(g)
        nuc, ratio = res.nuclear[name]
        assert rel_err(nuc, s.sum(1)) < 1e-4
        assert rel_err(ratio, s[:, 0] / s.sum(1)) < 1e-4
    # requires_grad restored
    assert all(p.requires_grad for p in llama.parameters())
    # the projector reproduces the engine's features from the flat gradient
    proj = eng.projector.project_flat(res.flat, eng.param_names, eng.param_shapes)
    assert torch.allclose(proj, res.features, rtol=1e-4, atol=1e-5 * res.features.abs().max().item())


def test_materialise_and_ghost_chosen_by_shape():
    # T >> d: materialising is cheaper and "auto" takes it; T small: ghost. Both must agree with autograd.
    model = build_llama(LlamaShape(hidden=8, layers=1, heads=2, intermediate=8, vocab=40), seed=1)
    batch = make_batch([40, 33], vocab=40)
    eng = PerSampleGradients(model, EngineConfig(feature_dim=0))
    check(eng.compute(batch), reference(model, batch, eng))


@pytest.mark.parametrize("layer_stats", [True, False])
def test_long_sequences_split_grams_and_summed_ghost_norms(llama, layer_stats):
    # T >= GRAM_SPLIT_MIN: Grams from their column blocks; without layer stats the output-gradient Grams of the
    # modules sharing an input are summed before the product. Odd and padded lengths, block Linear only too.
    batch = make_batch([GRAM_SPLIT_MIN + 3, GRAM_SPLIT_MIN - 20, 9], prompt=3, seed=4)
    for parameters in ("all", "block_linear"):
        cfg = EngineConfig(feature_dim=0, layer_stats=layer_stats, parameters=parameters)
        eng = PerSampleGradients(llama, cfg, strategy="ghost")
        res = eng.compute(batch)
        ref = reference(llama, batch, eng)
        assert rel_err(res.grad_norm, ref["flat"].norm(dim=1)) < REL
        assert sorted(res.layer_norms) == (sorted(eng.module_names) if layer_stats else [])


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialise"])
def test_block_linear_propagates_no_gradient_below_the_first_block(llama, strategy):
    # Only the blocks' Linear layers are covered: the first block's q/k/v and gate/up outputs are the leaves,
    # so nothing below them (embedding, first norm) is differentiated, and the norms still equal autograd's.
    seen = []
    norm = llama.model.layers[0].input_layernorm
    handle = norm.register_forward_hook(lambda mod, args, out: seen.append(out.requires_grad))
    try:
        batch = make_batch([GRAM_SPLIT_MIN + 5, 11, 30], prompt=2, seed=5)
        eng = PerSampleGradients(llama, EngineConfig(feature_dim=64, parameters="block_linear"), strategy=strategy)
        res = eng.compute(batch, flat_grads=True)
    finally:
        handle.remove()
    assert seen == [False]
    check(res, reference(llama, batch, eng))


def test_gram_products_count_the_blocks():
    gen = torch.Generator().manual_seed(0)
    for t in (1, 7, GRAM_SPLIT_MIN - 1, GRAM_SPLIT_MIN, GRAM_SPLIT_MIN + 3, 4 * GRAM_SPLIT_MIN + 1):
        a, g = torch.randn(2, t, 3, generator=gen), torch.randn(2, t, 5, generator=gen)
        assert gram_products(t, 3) == sum(3 * b.shape[1] * b.shape[2] for b in gram_blocks(a))
        # the blocks' ghost product is <a a^T, g g^T> (+ sum(g g^T) for a bias), summed Grams included
        gx, gg = a.double() @ a.double().mT, g.double() @ g.double().mT
        for bias in (False, True):
            got = ghost_blocks(gram_blocks(a), gram_blocks(g), bias).double()
            assert rel_err(got, ((gx + bias) * gg).sum((1, 2))) < REL
        acc = gram_blocks(g)
        gram_blocks(2 * g, acc)
        assert rel_err(ghost_blocks(gram_blocks(a), acc).double(), 5 * (gx * gg).sum((1, 2))) < REL


def test_embedding_norm_sums_repeated_ids():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5, (3, 40), generator=gen)
    ids[1] = 2  # one id throughout
    ids[2] = torch.arange(40)  # all distinct
    e = torch.randn(3, 40, 6, generator=gen)
    want = embedding_materialise(ids, e.double(), 40).pow(2).sum(dim=(1, 2))
    assert rel_err(embedding_sq_norm(ids, e), want) < REL


@pytest.mark.parametrize("layer_stats", [True, False])
def test_bert_ghost_norms_with_biases_and_repeated_ids(layer_stats):
    # Long padded rows over a small vocabulary: every Linear's bias norm comes from its ghost product over the
    # column-block Grams; word, position and token-type embeddings from their repeated ids' summed gradients.
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=GRAM_SPLIT_MIN + 8, num_labels=2)  # fmt: skip
    torch.manual_seed(1)
    model = BertForSequenceClassification(cfg).eval()
    batch = make_batch([GRAM_SPLIT_MIN + 5, GRAM_SPLIT_MIN - 9, 7], vocab=20, seed=7)
    batch = Batch(batch.input_ids, batch.attention_mask, torch.tensor([1, 0, 1]))
    eng = PerSampleGradients(model, EngineConfig(feature_dim=0, layer_stats=layer_stats), strategy="ghost")
    res = eng.compute(batch)
    ref = reference(model, batch, eng, classification=True)
    assert rel_err(res.grad_norm, ref["flat"].norm(dim=1)) < REL
    if layer_stats:
        check(res, ref)


def test_tied_embeddings(llama):
    model = build_llama(LlamaShape(hidden=32, layers=1, heads=4, intermediate=64, tie_embeddings=True), seed=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = make_batch([10, 6, 8], prompt=1, seed=3)
    for strategy in ("ghost", "materialise"):
        eng = PerSampleGradients(model, EngineConfig(feature_dim=128), strategy=strategy)
        res = eng.compute(batch, flat_grads=True)
        assert "lm_head" not in res.layer_norms
        check(res, reference(model, batch, eng))


def test_loss_reduction_sum(llama):
    batch = make_batch([9, 5], seed=4)
    eng = PerSampleGradients(llama, EngineConfig(loss_reduction="sum", feature_dim=0))
    check(eng.compute(batch), reference(llama, batch, eng, reduction="sum"))


def test_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    batch = make_batch([11, 5, 8], vocab=100, seed=5)
    batch = Batch(batch.input_ids, batch.attention_mask, torch.tensor([0, 2, 1]))
    eng = PerSampleGradients(model, EngineConfig(feature_dim=256, nuclear_modules=["attention.self.query"]))
    res = eng.compute(batch, flat_grads=True)
    ref = reference(model, batch, eng, classification=True)
    check(res, ref)
    for k in ("bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings", "classifier"):
        assert k in res.layer_norms
    assert eng.num_params == sum(p.numel() for p in model.parameters())


def test_lora_mode(llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero; give it values so both factors have gradients
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = make_batch([10, 6, 8], seed=6)
    eng = PerSampleGradients(model, EngineConfig(parameters="lora", feature_dim=64))
    assert all("lora_" in n for n in eng.param_names) and len(eng.param_names) == 8
    res = eng.compute(batch, flat_grads=True)
    check(res, reference(model, batch, eng))
    assert eng.num_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_block_linear_mode(llama):
    """Only the blocks' Linear layers (the peers' coverage): their norms against autograd over those alone."""
    batch = make_batch([10, 6, 8], seed=7)
    eng = PerSampleGradients(llama, EngineConfig(parameters="block_linear", feature_dim=64))
    linear = {f"{n}.weight" for n, m in llama.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    assert set(eng.param_names) == linear
    check(eng.compute(batch, flat_grads=True), reference(llama, batch, eng))


def test_batch_invariance(llama):
    cfg = EngineConfig(feature_dim=256, nuclear_modules=["v_proj"])
    eng = PerSampleGradients(llama, cfg)
    a = make_batch([8, 3], seed=7)
    other = make_batch([15, 12, 2], seed=8, total=20)
    ids = torch.zeros(4, 20, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE_INDEX)
    ids[:3], mask[:3], labels[:3] = other.input_ids, other.attention_mask, other.labels
    ids[3, :8], mask[3, :8], labels[3, :8] = a.input_ids[0], a.attention_mask[0], a.labels[0]
    r1 = eng.compute(a)
    r2 = eng.compute(Batch(ids, mask, labels))
    assert rel_err(r2.loss[3:], r1.loss[:1]) < REL
    assert rel_err(r2.grad_norm[3:], r1.grad_norm[:1]) < REL
    for k in r1.layer_norms:
        assert rel_err(r2.layer_norms[k][3:], r1.layer_norms[k][:1]) < REL
    for k in r1.nuclear:
        assert rel_err(r2.nuclear[k][0][3:], r1.nuclear[k][0][:1]) < 1e-4
    assert torch.allclose(r2.features[3], r1.features[0], rtol=1e-4, atol=1e-6)
    # micro-batching does not change results either
    r3 = PerSampleGradients(llama, cfg.model_copy(update={"micro_batch_size": 1})).compute(Batch(ids, mask, labels))
    assert rel_err(r3.grad_norm, r2.grad_norm) < REL


def test_projection_tracks_cosine():
    # 40 samples in 8 groups: each a copy of its group's base text with a varying fraction of tokens
    # replaced, so gradient cosines spread from ~0 (unrelated texts) to ~1 (near duplicates).
    model = build_llama(LlamaShape(hidden=32, layers=2, heads=4, intermediate=64, vocab=260), seed=9)
    gen = torch.Generator().manual_seed(10)
    bases = torch.randint(3, 260, (8, 24), generator=gen)
    ids = bases.repeat_interleave(5, dim=0).clone()
    rate = torch.rand(40, 1, generator=gen) * 0.8
    swap = torch.rand(40, 24, generator=gen) < rate
    ids[swap] = torch.randint(3, 260, (int(swap.sum()),), generator=gen)
    lengths = torch.randint(16, 25, (40,), generator=gen)
    mask = (torch.arange(24)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    batch = Batch(ids, mask, labels)
    eng = PerSampleGradients(model, EngineConfig(feature_dim=8192, projection_seed=3))
    res = eng.compute(batch, flat_grads=True)
    assert res.features.shape == (40, 8192)
    full = torch.nn.functional.normalize(res.flat.double(), dim=1)
    feat = torch.nn.functional.normalize(res.features.double(), dim=1)
    pairs = torch.combinations(torch.arange(40))[torch.randperm(780, generator=gen)[:100]]
    cos_full = (full[pairs[:, 0]] * full[pairs[:, 1]]).sum(1)
    cos_feat = (feat[pairs[:, 0]] * feat[pairs[:, 1]]).sum(1)
    r = torch.corrcoef(torch.stack([cos_full, cos_feat]))[0, 1].item()
    assert r >= 0.9, r
    # reproducible from the seed
    again = PerSampleGradients(model, EngineConfig(feature_dim=8192, projection_seed=3)).compute(batch)
    assert torch.equal(again.features, res.features)


def test_module_key():
    assert module_key("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert module_key("bert.encoder.layer.1.attention.self.query") == (1, "attention.self.query")
    assert module_key("lm_head") == (-1, "lm_head")
    assert module_key("model.embed_tokens") == (-1, "model.embed_tokens")


def test_unsupported_parameters_raise(llama):
    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.scale = nn.Parameter(torch.ones(1))

    model = copy.deepcopy(llama)
    model.model.layers[0].mlp = Scaled(model.model.layers[0].mlp)
    with pytest.raises(NotImplementedError, match="scale"):
        PerSampleGradients(model, EngineConfig())
    with pytest.raises(ValueError, match="nuclear"):
        PerSampleGradients(llama, EngineConfig(nuclear_modules=["nonexistent"]))


def test_nuclear_eigh_path_matches_svd():
    from gradsift.engine import kernels as em

    gen = torch.Generator().manual_seed(12)
    m = torch.randn(3, 20, 20, generator=gen)
    a, b = em._svdvals(m, "svd"), em._svdvals(m, "eigh").float()
    assert rel_err(b.sum(1), a.sum(1)) < 1e-5 and rel_err(b[:, 0], a[:, 0]) < 1e-5
