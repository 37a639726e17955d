"""Score formulas on hand-checkable cases and against autograd (GraNd via the engine, VoG gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsift.data.batching import Encoded
from gradsift.models.adapter import per_sample_loss
from gradsift.models.loading import build_llama, byte_tokenizer
from gradsift.signals import dynamics as dyn
from gradsift.training.proxy import HeadProxy, HFProxy


def test_margin_and_el2n_by_hand():
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    assert torch.allclose(dyn.margin(logits, labels), torch.tensor([1.0, -2.0]))
    probs = torch.softmax(logits, -1)
    expected = torch.stack(
        [(probs[0] - torch.tensor([1.0, 0, 0])).norm(), (probs[1] - torch.tensor([0, 0, 1.0])).norm()]
    )
    assert torch.allclose(dyn.el2n(logits, labels), expected)
    # uniform prediction over C classes: sqrt((1 - 1/C)^2 + (C - 1)/C^2)
    assert dyn.el2n(torch.zeros(1, 4), torch.tensor([1])).item() == pytest.approx(np.sqrt(0.75**2 + 3 / 16))


def test_visit_stats_classification_and_causal_lm():
    stats = dyn.visit_stats(torch.tensor([[2.0, 0.5], [0.0, 1.0]]), torch.tensor([0, 0]), "classification")
    assert stats["pred"].tolist() == [0, 1] and stats["correct"].tolist() == [True, False]
    assert stats["margin"].tolist() == [1.5, -1.0]
    # causal LM: position t predicts token t+1; only target tokens count
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5.0  # predicts token 2 correctly
    logits[0, 1, 1] = 5.0  # predicts 1, target is 3
    s = dyn.visit_stats(logits, torch.tensor([[-100, 2, 3]]), "causal_lm")
    assert s["pred"].item() == -1 and s["correct"].item()  # half the tokens right
    assert s["margin"].item() == pytest.approx((5.0 - 5.0) / 2)


def test_forgetting_counts_transitions_and_marks_never_learned():
    events, never = dyn.forgetting(np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]]))
    assert events.tolist() == [2, 0, 0, 0]
    assert never.tolist() == [False, True, False, False]


def test_aum_threshold_tracin_grand_zscore_auroc():
    assert dyn.aum(np.array([[1.0, 3.0], [-2.0, 0.0]])).tolist() == [2.0, -1.0]
    assert dyn.aum_threshold(np.arange(101.0), 99) == pytest.approx(99.0)
    assert dyn.tracin_self_influence([0.1, 0.01], np.array([[2.0, 1.0], [10.0, 0.0]])).tolist() == pytest.approx(
        [0.1 * 4 + 0.01 * 100, 0.1]
    )
    assert dyn.grand(np.array([[1.0, 2.0], [3.0, 4.0]])).tolist() == [2.0, 3.0]
    z = dyn.zscore(np.array([1.0, 3.0, 10.0, 20.0]), ["a", "a", "b", "b"])
    assert z.tolist() == [-1.0, 1.0, -1.0, 1.0]
    assert dyn.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert dyn.auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5


def test_vog_is_mean_variance_over_checkpoints():
    g1, g2 = torch.zeros(1, 2, 3), torch.ones(1, 2, 3) * 2
    g2[0, 1] = 100.0  # a pad position: masked out
    assert dyn.vog([g1, g2], torch.tensor([[1, 0]])).item() == pytest.approx(1.0)  # var of {0, 2}


def test_head_grad_norms_and_input_grads_match_autograd():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x, y = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2])
    proxy = HeadProxy(head, x, y)
    idx = np.arange(6)
    norms = proxy.grad_norms(idx)
    input_grads, _ = proxy.input_grads(idx)
    for i in range(6):
        head.zero_grad()
        xi = torch.from_numpy(x[i : i + 1]).requires_grad_(True)
        out = head(xi)
        per_sample_loss(out, torch.tensor([y[i]]), "classification").sum().backward(retain_graph=True)
        ref = torch.sqrt(sum(p.grad.pow(2).sum() for p in head.parameters()))
        assert norms[i].item() == pytest.approx(ref.item(), rel=1e-5)
        (gold,) = torch.autograd.grad(out[0, y[i]], xi)
        assert torch.allclose(input_grads[i], gold[0], atol=1e-6)


def test_grand_via_engine_and_vog_gradient_match_autograd_on_a_causal_lm():
    model = build_llama(seed=0)
    tok = byte_tokenizer()
    texts = ["hello there", "a longer sample text"]
    items = []
    for i, t in enumerate(texts):
        ids = [1, *tok(t, add_special_tokens=False)["input_ids"], 2]
        items.append(Encoded("d", f"s{i}", ids, [-100, *ids[1:]]))
    proxy = HFProxy(model, tok, "causal_lm", items, lora=False)
    idx = np.arange(2)
    norms = proxy.grad_norms(idx)
    input_grads, mask = proxy.input_grads(idx)
    for i, it in enumerate(items):
        model.zero_grad()
        ids, labels = torch.tensor([it.input_ids]), torch.tensor([it.target])
        logits = model(input_ids=ids).logits
        per_sample_loss(logits, labels, "causal_lm").sum().backward()
        ref = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
        assert norms[i].item() == pytest.approx(ref.item(), rel=1e-3)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        gold = dyn.gold_logit(model(inputs_embeds=embeds).logits, labels, "causal_lm")
        (ref_g,) = torch.autograd.grad(gold.sum(), embeds)
        n = len(it.input_ids)
        assert torch.allclose(input_grads[i, :n], ref_g[0], atol=1e-5)
        assert mask[i].sum().item() == n
