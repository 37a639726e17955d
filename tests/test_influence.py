"""LESS features at checkpoints against a direct autograd computation; blocked streaming against dense."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradsift.data.batching import collate
from gradsift.models.adapter import adapter, per_sample_loss
from gradsift.models.checkpoints import list_checkpoints, save_checkpoint
from gradsift.models.loading import LlamaShape, build_llama, byte_tokenizer
from gradsift.signals.influence import (
    CheckpointFeaturizer,
    FeatureSource,
    Targets,
    adam_direction,
    block_scores,
    checkpoint_name,
    l2_normalise,
    merge_top_k,
    read_block,
)

TEXTS = ["Question: 2 + 3?\nAnswer: ", "Question: 7 - 1?\nAnswer: ", "Write a loop.\n", "Name a fruit.\n"]
RESPONSES = ["#### 5", "7 - 1 = 6 #### 6", "for i in range(3): print(i)", "An apple."]


def _samples(n: int = 4) -> pa.Table:
    rows = [
        {"dataset": "d", "sample_id": f"s{i}", "prompt": TEXTS[i % 4], "response": RESPONSES[i % 4], "text": None}
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows)


def _lora_checkpoints(store, tmp_path) -> list:
    """Tiny Llama saved as a base folder, LoRA adapters trained a few AdamW steps, two checkpoints."""
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    build_llama(LlamaShape(hidden=32, layers=2, heads=2, intermediate=64)).save_pretrained(base)
    tok = byte_tokenizer()
    tok.save_pretrained(base)
    from gradsift.models.loading import load_model

    model, _ = load_model(str(base))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    items = [adapter("causal_lm").encode(r, tok, None) for r in _samples().to_pylist()]
    batch = collate(items, tok.pad_token_id)
    model.train()
    for step in range(1, 5):
        loss = per_sample_loss(
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels, "causal_lm"
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 == 0:
            meta = {
                "step": step,
                "epoch": step // 2,
                "lr": 1e-2 / step,
                "base_model": str(base),
                "lora": True,
                "task": "causal_lm",
                "label_index": None,
            }
            save_checkpoint(store, "t", model, opt, tok, meta)
    return list_checkpoints(store, "t")


def _check_stored_names(staging_dir, info, samples, tables) -> None:
    """The stored names stay "<train_run>.step-NNNNNN:<kind>" (column) and "<shard>@<checkpoint>" (part), and
    read_block finds the part and the rows through FeatureSource.at_checkpoint."""
    import pyarrow.parquet as pq

    from gradsift.storage.keys import FeaturePart

    name = checkpoint_name(info)
    assert name == f"t.step-{info.step:06d}"
    for kind, table in tables.items():
        assert table.column("checkpoint").unique().to_pylist() == [f"{name}:{kind}"]
    shard = "d-00000-0123456789"
    (staging_dir / "samples").mkdir(parents=True)
    (staging_dir / "features").mkdir()
    pq.write_table(samples.append_column("domain", pa.array([None] * len(samples), pa.string())),
                   staging_dir / "samples" / f"{shard}.parquet")  # fmt: skip
    pq.write_table(pa.concat_tables(tables.values()), staging_dir / "features" / f"{shard}@{name}.parquet")
    assert FeaturePart(shard, name).name == f"{shard}@{name}"
    keys, feats = read_block(staging_dir, [shard], [FeatureSource.at_checkpoint(name, info.lr)])
    assert keys["sample_id"] == samples.column("sample_id").to_pylist()
    assert {kind: f[0].shape for kind, f in feats.items()} == {"grad": (len(samples), 64), "adam": (len(samples), 64)}


def test_less_scores_equal_direct_computation(tmp_path):
    infos = _lora_checkpoints(tmp_path / "store", tmp_path)
    assert [c.step for c in infos] == [2, 4]
    samples = _samples()
    train_idx, target_idx = [0, 2, 3], [1]
    feats = {"grad": [], "adam": []}
    direct_train, direct_target = [], []
    for info in infos:
        fz = CheckpointFeaturizer(info, feature_dim=64, seed=3)
        tables = fz.featurize(samples)
        _check_stored_names(tmp_path / f"staged-{info.step}", info, samples, tables)
        for kind in feats:
            t = tables[kind]
            order = {s: i for i, s in enumerate(t.column("sample_id").to_pylist())}
            mat = np.stack(t.column("feature").to_numpy(zero_copy_only=False))
            feats[kind].append(mat[[order[f"s{i}"] for i in range(4)]])
        # direct: autograd per-sample LoRA gradient -> Adam direction -> same projection
        model, eng = fz.model, fz.engine
        params = dict(model.named_parameters())
        tok = fz.tokenizer
        rows = samples.to_pylist()
        g_rows = []
        for r in rows:
            b = collate([adapter("causal_lm").encode(r, tok, None)], tok.pad_token_id)
            loss = per_sample_loss(model(input_ids=b.input_ids).logits, b.labels, "causal_lm").sum()
            gs = torch.autograd.grad(loss, [params[n] for n in eng.param_names])
            g_rows.append(torch.cat([g.reshape(-1) for g in gs]))
        g = torch.stack(g_rows)
        adam = adam_direction(g, fz.exp_avg, fz.exp_avg_sq, fz.betas, fz.eps)
        proj = eng.projector
        direct_train.append(proj.project_flat(adam, eng.param_names, eng.param_shapes).numpy())
        direct_target.append(proj.project_flat(g, eng.param_names, eng.param_shapes).numpy())
    lrs = np.array([c.lr for c in infos])
    targets = Targets(
        ["a", "b"], [f[target_idx].astype(np.float32) for f in feats["grad"]], lrs, np.zeros(1, int), ["s1"]
    )
    got = block_scores({k: [f[train_idx] for f in v] for k, v in feats.items()}, targets, ["less"], top_k=0).scores[
        "less"
    ]
    want = sum(
        lr * (l2_normalise(tr[train_idx]) @ l2_normalise(tg[target_idx]).T)[:, 0]
        for lr, tr, tg in zip(lrs, direct_train, direct_target, strict=True)
    )
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3)  # features are stored as float16


@pytest.mark.parametrize("row_chunk", [2048, 50])
def test_blocked_streaming_equals_dense(row_chunk, monkeypatch):
    import gradsift.signals.influence as influence

    monkeypatch.setattr(influence, "ROW_CHUNK", row_chunk)  # 50: blocks of 128 rows cast in 3 chunks
    rng = np.random.default_rng(0)
    n, m, k, c = 1000, 37, 48, 2
    grad = [rng.normal(size=(n, k)).astype(np.float16) for _ in range(c)]
    adam = [rng.normal(size=(n, k)).astype(np.float16) for _ in range(c)]
    tfeat = [rng.normal(size=(m, k)).astype(np.float32) for _ in range(c)]
    subtask = rng.integers(0, 3, size=m)
    lrs = np.array([0.5, 0.25])
    targets = Targets(["a", "b"], tfeat, lrs, subtask, [str(i) for i in range(m)])
    methods = ["less", "tracin", "cosine"]
    blocks = [(s, min(s + 128, n)) for s in range(0, n, 128)]
    parts = [
        block_scores({"grad": [g[s:e] for g in grad], "adam": [a[s:e] for a in adam]}, targets, methods, 5)
        for s, e in blocks
    ]
    for method in methods:
        tr = adam if method == "less" else grad
        norm = (
            (lambda x: x.astype(np.float64)) if method == "tracin" else (lambda x: l2_normalise(x).astype(np.float64))
        )
        w = lrs if method != "cosine" else np.full(c, 1 / c)
        dense = sum(wi * norm(tr[i]) @ norm(tfeat[i]).T for i, wi in enumerate(w))  # [n, m]
        per_sub = np.stack([dense[:, subtask == s].mean(axis=1) for s in range(3)], axis=1).max(axis=1)
        got = np.concatenate([p.scores[method] for p in parts])
        np.testing.assert_allclose(got, per_sub, rtol=1e-4, atol=1e-4)
        rows, vals = merge_top_k(
            [(p.top_rows[method] + s, p.top_vals[method]) for p, (s, _) in zip(parts, blocks, strict=True)], 5
        )
        np.testing.assert_array_equal(rows, np.argsort(-dense, axis=0, kind="stable")[:5])
        np.testing.assert_allclose(vals, np.sort(dense, axis=0)[::-1][:5], rtol=1e-4, atol=1e-4)


def test_checkpoint_features_on_the_pool_equal_direct_and_resume(tmp_path, ray_local):
    """Featurising at checkpoints through the executor (a checkpoint an item) writes what the featurizer
    computes in process, one part per shard and checkpoint; a rerun finds every part and does nothing."""
    from gradsift.executors.ray import run_on_pool
    from gradsift.executors.workers import CheckpointFeatures
    from gradsift.schemas.config import RayConfig
    from gradsift.signals.influence import checkpoint_name
    from gradsift.storage.store import Store

    store = Store(tmp_path / "store")
    infos = _lora_checkpoints(store.root, tmp_path)
    staging = store.staging("r")
    staging.write_part("samples", "d-0", _samples())
    items = [(info, ["d-0"]) for info in infos]
    worker, config = (str(store.root), "r", 64, 3), RayConfig(address=None, num_actors=2)
    done = run_on_pool(CheckpointFeatures, worker, items, config)
    assert sorted(d["checkpoint"] for d in done) == sorted(checkpoint_name(c) for c in infos)
    assert all(d["rows"] == 4 for d in done)
    for info in infos:
        got = pq.read_table(staging.part_path("features", f"d-0@{checkpoint_name(info)}"))
        want = pa.concat_tables(CheckpointFeaturizer(info, feature_dim=64, seed=3).featurize(_samples()).values())
        assert got.column("checkpoint").to_pylist() == want.column("checkpoint").to_pylist()
        np.testing.assert_array_equal(
            np.stack(got.column("feature").to_numpy(zero_copy_only=False)),
            np.stack(want.column("feature").to_numpy(zero_copy_only=False)),
        )
    assert [d["rows"] for d in run_on_pool(CheckpointFeatures, worker, items, config)] == [0, 0]
