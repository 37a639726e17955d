"""Fast vs slow thinking: layer-wise gradient nuclear-norm curves per response variant (no prefect or ray).

Li et al. 2024, "What Happened in LLMs Layers when Trained for Fast vs. Slow Thinking: A Gradient
Perspective" (Layer_Gradient): for each response variant of the same prompts (answer only = fast,
step-by-step solution = slow), the per-sample gradient of each attention projection W (q/k/v/o) gets
its nuclear norm ||G||_*; the curve is its mean over samples per layer; the variants are compared by
the mean absolute difference of their curves over the early, middle and late thirds of the layers.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from gradsift.data.batching import Encoded, collate, encode_causal, micro_batches
from gradsift.engine.gradients import module_key

PARTS = ("early", "middle", "late")


def gsm8k_variants(question: str, answer: str) -> dict[str, tuple[str, str]]:
    """(prompt, response) per variant: fast = the final answer after '####', slow = the full solution."""
    prompt = f"Question: {question}\nAnswer: "
    return {"fast": (prompt, answer.split("####")[-1].strip()), "slow": (prompt, answer)}


def nuclear_curves(engine, tokenizer, pairs: list[tuple[str, str]], max_tokens: int) -> dict[tuple[int, str], dict]:
    """Mean nuclear norm and gradient norm per (layer, module short name) over (prompt, response) samples."""
    items = []
    for i, (prompt, response) in enumerate(pairs):
        ids, targets = encode_causal(tokenizer, prompt, response, None)
        items.append(Encoded("x", str(i), ids[:max_tokens], targets[:max_tokens]))
    dev = next(engine.model.parameters()).device
    nuc: dict[tuple[int, str], list[float]] = defaultdict(list)
    fro: dict[tuple[int, str], list[float]] = defaultdict(list)
    for group in micro_batches(items, engine.config.micro_batch_size):
        out = engine.compute(collate(group, tokenizer.pad_token_id).to(dev))
        for name, (nuclear, _ratio) in out.nuclear.items():
            layer, module = module_key(name)
            key = (layer, module.rsplit(".", 1)[-1])
            nuc[key] += nuclear.tolist()
            fro[key] += out.layer_norms[name].tolist() if name in out.layer_norms else []
    return {
        k: {"nuclear_norm": float(np.mean(v)), "grad_norm": float(np.mean(fro[k])) if fro[k] else None, "n": len(v)}
        for k, v in nuc.items()
    }


def third_diffs(curve_a: dict[tuple[int, str], dict], curve_b: dict[tuple[int, str], dict]) -> list[dict]:
    """Mean |curve_a - curve_b| of the nuclear norm per module over the early/middle/late thirds of the layers."""
    rows = []
    for module in sorted({m for _, m in curve_a}):
        layers = sorted(layer for layer, m in curve_a if m == module and (layer, m) in curve_b)
        for part, chunk in zip(PARTS, np.array_split(np.array(layers), 3), strict=True):
            if len(chunk):
                d = [
                    abs(curve_a[(int(i), module)]["nuclear_norm"] - curve_b[(int(i), module)]["nuclear_norm"])
                    for i in chunk
                ]
                rows.append({"module": module, "part": part, "mean_abs_diff": float(np.mean(d))})
    return rows
