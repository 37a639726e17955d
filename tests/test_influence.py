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
    assert {kind: np.concatenate(f[0]).shape for kind, f in feats.items()} == {
        "grad": (len(samples), 64),
        "adam": (len(samples), 64),
    }


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


def _dense(method, grad, adam, tfeat, lrs, subtask):
    """The plain in-memory computation: [n, m] influence and the per-sample score (mean per subtask, max)."""
    tr = adam if method == "less" else grad
    norm = (lambda x: x.astype(np.float64)) if method == "tracin" else (lambda x: l2_normalise(x).astype(np.float64))
    w = lrs if method != "cosine" else np.full(len(lrs), 1 / len(lrs))
    dense = sum(wi * norm(tr[i]) @ norm(tfeat[i]).T for i, wi in enumerate(w))  # [n, m]
    n_sub = subtask.max() + 1
    return dense, np.stack([dense[:, subtask == s].mean(axis=1) for s in range(n_sub)], axis=1).max(axis=1)


@pytest.mark.parametrize("row_chunk", [2048, 50])
def test_blocked_streaming_equals_dense(row_chunk, monkeypatch):
    import gradsift.signals.influence as influence
    from gradsift.signals.mixture import DomainSums

    monkeypatch.setattr(influence, "ROW_CHUNK", row_chunk)  # 50: blocks of 128 rows cast in 3 chunks
    rng = np.random.default_rng(0)
    n, m, k, c = 1000, 37, 48, 2
    grad = [rng.normal(size=(n, k)).astype(np.float16) for _ in range(c)]
    adam = [rng.normal(size=(n, k)).astype(np.float16) for _ in range(c)]
    tfeat = [rng.normal(size=(m, k)).astype(np.float32) for _ in range(c)]
    subtask = rng.integers(0, 3, size=m)
    domains = rng.choice(np.array(["web", "code", "math"]), size=n)
    lrs = np.array([0.5, 0.25])
    targets = Targets(["a", "b"], tfeat, lrs, subtask, [str(i) for i in range(m)])
    methods = ["less", "tracin", "cosine"]
    blocks = [(s, min(s + 128, n)) for s in range(0, n, 128)]

    def rows(f, s, e, b):  # odd blocks as pieces (uneven, across chunk boundaries), even blocks as one array
        return [f[s : s + 7], f[s + 7 : s + 60], f[s + 60 : e]] if b % 2 else f[s:e]

    parts = [
        block_scores(
            {"grad": [rows(g, s, e, b) for g in grad], "adam": [rows(a, s, e, b) for a in adam]},
            targets,
            methods,
            5,
            domains=domains[s:e],
        )
        for b, (s, e) in enumerate(blocks)
    ]
    for method in methods:
        dense, per_sub = _dense(method, grad, adam, tfeat, lrs, subtask)
        got = np.concatenate([p.scores[method] for p in parts])
        np.testing.assert_allclose(got, per_sub, rtol=1e-4, atol=1e-4)
        rows_, vals = merge_top_k(
            [(p.top_rows[method] + s, p.top_vals[method]) for p, (s, _) in zip(parts, blocks, strict=True)], 5
        )
        np.testing.assert_array_equal(rows_, np.argsort(-dense, axis=0, kind="stable")[:5])
        np.testing.assert_allclose(vals, np.sort(dense, axis=0)[::-1][:5], rtol=1e-4, atol=1e-4)
    for j in range(c):  # the fused float32 domain sums against DomainSums.add in float64
        fused = DomainSums()
        for p in parts:
            fused.merge(p.sums[j])
        want = DomainSums().add(grad[j], domains)
        assert fused.count == want.count
        for d in want.count:
            np.testing.assert_allclose(fused.vec[d], want.vec[d], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(fused.norm[d], want.norm[d], rtol=1e-5)


def _stage_features(tmp_path, sizes: dict[str, int], rng) -> tuple[dict, dict]:
    """Samples and float16 features parts of shards ``sizes`` (shard -> rows; "t-*" targets without a domain):
    "d-1" without raw rows (decoded on read), "d-2"'s features not in its samples' order. -> (feats, ids)."""
    from gradsift.signals.scoring import features_table
    from gradsift.storage import feature_rows
    from gradsift.storage.atomic import write_parquet_atomic

    k, feats, ids = 32, {}, {}
    for shard, n in sizes.items():
        ids[shard] = [f"{shard}-{i}" for i in range(n)]
        feats[shard] = rng.normal(size=(n, k)).astype(np.float16)
        domain = [None if shard.startswith("t") else ("a" if i % 3 else "b") for i in range(n)]
        samples = pa.table({"dataset": [shard[0]] * n, "sample_id": ids[shard], "domain": domain})
        write_parquet_atomic(samples, tmp_path / "samples" / f"{shard}.parquet")
        order = rng.permutation(n) if shard == "d-2" else np.arange(n)
        rows = [{"checkpoint": "c", "dataset": shard[0], "sample_id": ids[shard][i], "feature": feats[shard][i]}
                for i in order]  # fmt: skip
        table = features_table(rows, k)
        write_parquet_atomic(table, feature_rows.part_path(tmp_path, shard))
        if shard != "d-1":
            feature_rows.write_rows(tmp_path, shard, table)
    return feats, ids


def test_score_block_from_staged_parts_equals_dense(tmp_path):
    """score_block over a staging folder: one part with raw rows (memory-mapped), one without (decoded, then
    written), one whose rows are not in the samples' order; scores and domain sums equal the in-memory computation."""
    from gradsift.signals.influence import read_targets, score_block
    from gradsift.signals.mixture import DomainSums

    feats, ids = _stage_features(tmp_path, {"t-0": 9, "d-0": 40, "d-1": 33, "d-2": 21}, np.random.default_rng(5))
    src = [FeatureSource.final("c")]
    targets = read_targets(tmp_path, ["t-0"], src, ["t"])[0]
    train = ["d-0", "d-1", "d-2"]
    got = score_block(tmp_path, train, src, targets, ["cosine", "tracin"], 3)
    assert got["keys"]["sample_id"] == [i for s in train for i in ids[s]]
    grad = np.concatenate([feats[s] for s in train])
    for method in ("cosine", "tracin"):
        _, want = _dense(method, [grad], None, [feats["t-0"].astype(np.float32)], np.ones(1), np.zeros(9, int))
        np.testing.assert_allclose(got["scores"][method], want, rtol=1e-4, atol=1e-4)
    want_sums = DomainSums().add(grad, np.array(got["keys"]["domain"]))
    assert got["sums"][0].count == want_sums.count == {"a": 62, "b": 32}
    for d in ("a", "b"):
        np.testing.assert_allclose(got["sums"][0].vec[d], want_sums.vec[d], rtol=1e-5, atol=1e-4)
    assert len(list((tmp_path / "_scratch" / "feature_rows" / "d-1").glob("*.npy"))) == 1  # rebuilt on read


def test_influence_blocks_equal_on_threads_ray_actors_and_one_worker(tmp_path, ray_local):
    """The influence stage's blocks through ``run_on_pool`` on a thread pool, on Ray actors and on one worker
    (one thread): the merged scores, top-k and domain sums are identical, whatever ran them."""
    from gradsift.executors.ray import run_on_pool
    from gradsift.executors.workers import InfluenceBlocks
    from gradsift.schemas.config import RayConfig
    from gradsift.signals.influence import block_items, group_shards, merge_blocks

    sizes = {"t-0": 9} | {f"d-{i}": 10 + 7 * i for i in range(6)}
    _stage_features(tmp_path, sizes, np.random.default_rng(6))
    train = [s for s in sizes if s.startswith("d")]
    blocks = group_shards(train, sizes, 30)
    assert len(blocks) >= 3
    worker = (str(tmp_path), ["t-0"], [FeatureSource.final("c")], ["t"], ["cosine", "tracin"], 4)
    runs = []
    for n, threads in ((2, 2), (2, 0), (1, 1)):  # two threads, two Ray actors, one thread
        done = run_on_pool(InfluenceBlocks, worker, block_items(blocks, n), RayConfig(num_actors=n), threads=threads)
        runs.append(merge_blocks(sorted(done, key=lambda r: r["block"]), ["cosine", "tracin"], 4, 1))
    first = runs[0]
    for res in runs[1:]:
        assert res.keys == first.keys and res.blocks == first.blocks
        for method in ("cosine", "tracin"):
            np.testing.assert_array_equal(res.scores[method], first.scores[method])
            np.testing.assert_array_equal(res.top_k[method][0], first.top_k[method][0])
            np.testing.assert_array_equal(res.top_k[method][1], first.top_k[method][1])
        assert res.domain_sums[0].count == first.domain_sums[0].count
        for d in first.domain_sums[0].vec:
            np.testing.assert_array_equal(res.domain_sums[0].vec[d], first.domain_sums[0].vec[d])


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


def test_block_items_read_ahead_the_block_the_pool_hands_out_next():
    from gradsift.signals.influence import block_items

    blocks = [["a"], ["b", "c"], ["d"], ["e"]]
    assert block_items(blocks, 2) == [(0, ["a"], ["d"]), (1, ["b", "c"], ["e"]), (2, ["d"], []), (3, ["e"], [])]
    assert block_items(blocks, 4)[0] == (0, ["a"], [])
