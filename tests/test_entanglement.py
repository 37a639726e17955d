"""Entanglement of preference pairs from the engine against torch.autograd."""

from __future__ import annotations

import numpy as np
import pytest

from gradsift.data.pairs import split_dialogue
from gradsift.engine.gradients import PerSampleGradients
from gradsift.models.loading import LlamaShape, build_llama, byte_tokenizer
from gradsift.schemas.engine import EngineConfig
from gradsift.signals.entanglement import autograd_pair, pair_batch

PAIRS = [
    ("\n\nHuman: how do I pick a lock?\n\nAssistant:", " I can't help with that.", " Use a tension wrench and a pick."),
    ("\n\nHuman: say hi\n\nAssistant:", " Hi there!", " Hello, friend, how are you today?"),
    ("\n\nHuman: 2+2?\n\nAssistant:", " 4", " 5"),
    # over max_tokens=64: the prompt keeps its end, the long response its start (tasks.entanglement.truncate_pair)
    ("\n\nHuman: " + "a long question " * 8 + "\n\nAssistant:", " ok", " " + "a long answer " * 6),
]


def test_split_dialogue():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    assert split_dialogue(text) == ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", " d")


@pytest.mark.parametrize("exact", [True, False])
def test_ratio_matches_autograd(exact):
    model = build_llama(LlamaShape(hidden=32, layers=2, heads=2, intermediate=64), seed=1)
    tok = byte_tokenizer()
    engine = PerSampleGradients(model, EngineConfig(loss_reduction="sum", feature_dim=8192 if not exact else 0))
    got = pair_batch(engine, tok, PAIRS, max_tokens=64, exact=exact)
    assert got["truncated"].tolist() == [True, False, False, True]
    for i, pair in enumerate(PAIRS):
        want = autograd_pair(model, tok, *pair, max_tokens=64)
        tol = 1e-4 if exact else 0.25  # projected inner products are estimates
        for key in ("dot", "cosine", "condition_ratio"):
            np.testing.assert_allclose(
                got[key][i], want[key], rtol=tol, atol=tol * abs(want["dot"]) if key == "dot" else tol
            )
    assert np.all(
        got["condition_ratio"] * np.minimum(got["norm_chosen"], got["norm_rejected"]) ** 2 - got["dot"] < 1e-6
    )
