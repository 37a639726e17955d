"""In-run capture (gradsift.capture): recorded per-sample loss and gradient norm vs plain autograd on the same
batch and weights, gradient accumulation, LoRA, the HF Trainer callback, resume without duplicate visits,
missing ids, and one scoring code path with ``gradsift train``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from gradsift.capture import (
    CaptureCallback,
    MissingSampleIdsError,
    SampleIdCollator,
    capture,
    capture_run_id,
    captured_scores,
)
from gradsift.capture.record import VISITS
from gradsift.capture.scores import record_scores, record_visits
from gradsift.models.adapter import per_sample_loss, task_of
from gradsift.models.loading import LlamaShape, build_llama
from gradsift.schemas.capture import CaptureConfig
from gradsift.schemas.tables import CAPTURE_VISITS, DYNAMICS
from gradsift.storage.store import Store
from gradsift.training.loop import visit_scores

TOL = 1e-4


def tiny_classifier(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config).train()


def batch_of(n: int, seed: int, task: str = "classification", vocab: int = 50) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # padding
    if n > 1:
        mask[1, 4:] = 0
    ids = ids * mask
    labels = torch.randint(0, 2, (n,), generator=g) if task == "classification" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference(model: nn.Module, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample loss and || grad_w loss_i || by plain autograd on the same batch and weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    losses = per_sample_loss(model(**fwd).logits, batch["labels"], task_of(_base(model)))
    norms = []
    for i in range(len(losses)):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)).item())
    return losses.detach().numpy(), np.array(norms)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(np.asarray(b)), 1e-12)))


def run_steps(model, store, name, batches, accumulation, config=None) -> pa.Table:
    """Plain loop: ``accumulation`` micro-batches per optimiser step (lr 0, so every reference sees these weights)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with capture(model, str(store), name, config) as rec:
        for k, batch in enumerate(batches):
            out = model(**batch)
            (out.loss / accumulation).backward()
            ids = [f"s{k}-{i}" for i in range(len(batch["labels"]))]
            rec.step(ids, out, step=k // accumulation + 1)
            if (k + 1) % accumulation == 0:
                opt.step()
                opt.zero_grad()
    return Store(store).staging(capture_run_id(name)).read(VISITS)


def check_exact(model, batches, visits) -> None:
    for k, batch in enumerate(batches):
        loss, norm = reference(model, batch)
        rows = visits.filter(pa.compute.starts_with(visits["sample_id"], f"s{k}-")).to_pandas().sort_values("sample_id")
        assert rel(rows["loss"], loss) <= TOL
        assert rel(rows["grad_norm"], norm) <= TOL, (rows["grad_norm"].to_numpy(), norm)


@pytest.mark.parametrize("accumulation", [1, 4])
def test_classifier_loss_and_grad_norm_exact(tmp_path, accumulation):
    model = tiny_classifier()
    batches = [batch_of(4, seed) for seed in range(4)]
    visits = run_steps(model, tmp_path, f"acc{accumulation}", batches, accumulation)
    assert visits.num_rows == 16 and visits.schema.equals(CAPTURE_VISITS)
    assert sorted(set(visits["step"].to_pylist())) == list(range(1, 4 // accumulation + 1))
    check_exact(model, batches, visits)


def test_causal_lm_lora_exact(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_llama(LlamaShape(hidden=32, layers=1, intermediate=64)), LoraConfig(r=4))
    for name, p in model.named_parameters():  # non-zero B, so that every LoRA gradient is non-trivial
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.train()
    batches = [batch_of(3, seed, "causal_lm", vocab=260) for seed in range(4)]
    visits = run_steps(model, tmp_path, "lora", batches, 4, CaptureConfig(store=str(tmp_path), parameters="lora"))
    check_exact(model, batches, visits)
    assert (visits["n_tokens"].to_numpy() > 0).all()


def test_missing_ids_error(tmp_path):
    collate = SampleIdCollator(collator=lambda f: {"x": f})
    with pytest.raises(MissingSampleIdsError, match="remove_unused_columns=False"):
        collate([{"input_ids": [1, 2]}])
    model = tiny_classifier()
    with pytest.raises(MissingSampleIdsError, match="SampleIdCollator"), capture(model, str(tmp_path), "no") as rec:
        model(**batch_of(2, 0)).loss.backward()
        rec.step()


def test_same_scores_as_train_path():
    """The captured run's forgetting/AUM are ``visit_scores`` of the same visits (``gradsift train``'s function)."""
    rng = np.random.default_rng(0)
    n, epochs = 12, 3
    ids = [f"x{i:02d}" for i in range(n)]
    rows = []
    for e in range(1, epochs + 1):
        for j, i in enumerate(rng.permutation(n)):
            c = bool(rng.random() < 0.6)
            rows.append({
                "checkpoint": "r", "epoch": e, "step": (e - 1) * n + j + 1, "dataset": "d", "sample_id": ids[i],
                "loss": float(rng.random()), "correct": c, "margin": float(rng.normal()), "pred": int(c),
                "el2n": float(rng.random()), "grad_norm": float(rng.random()), "n_tokens": 1,
                "token_loss_max": 0.0, "lr": 0.1, "rank": 0,
            })  # fmt: skip
    visits = pa.Table.from_pylist(rows, schema=CAPTURE_VISITS)
    train_path = visit_scores(visits.select(DYNAMICS.names), ids)
    _, cols = record_scores(record_visits(visits))
    for key in ("forgetting", "never_learned", "aum"):
        np.testing.assert_array_equal(cols[key], train_path[key])
    table = captured_scores(visits, "capture-r").to_pandas().set_index("sample_id").loc[ids]
    np.testing.assert_array_equal(table["aum"].to_numpy(), train_path["aum"].astype(np.float32))
    np.testing.assert_array_equal(table["forgetting"].to_numpy(), train_path["forgetting"])


def sample_dataset(n: int = 24):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 4 + i % 5
        rows.append({
            "input_ids": torch.randint(3, 50, (length,), generator=g).tolist(), "attention_mask": [1] * length,
            "labels": i % 2, "sample_id": f"id{i:03d}",
        })  # fmt: skip
    return rows  # any map-style dataset: a list of features (a datasets.Dataset works the same)


class _Tok:
    """The padding a DataCollatorWithPadding needs (pad id 0, right padding)."""

    pad_token_id, padding_side, model_input_names = 0, "right", ["input_ids", "attention_mask"]

    def pad(self, features, return_tensors="pt", **kwargs):
        width = max(len(f["input_ids"]) for f in features)
        out = {k: [f[k] + [0] * (width - len(f[k])) for f in features] for k in ("input_ids", "attention_mask")}
        return {**{k: torch.tensor(v) for k, v in out.items()}, "labels": torch.tensor([f["labels"] for f in features])}


def trainer_for(model, out_dir, store, name, callbacks, **args):
    from transformers import Trainer, TrainingArguments

    base = {
        "output_dir": str(out_dir), "per_device_train_batch_size": 2, "use_cpu": True, "report_to": [], "seed": 0,
        "remove_unused_columns": False, "logging_strategy": "no", "save_strategy": "no", "disable_tqdm": True,
    }  # fmt: skip
    targs = TrainingArguments(**(base | args))
    collate = SampleIdCollator(collator=_Tok().pad)
    return Trainer(model=model, args=targs, train_dataset=sample_dataset(), data_collator=collate, callbacks=callbacks)


def test_trainer_callback_accumulation_exact(tmp_path):
    """HF Trainer, gradient accumulation 4, lr 0 (the weights stay those of every step): each recorded visit's
    loss and gradient norm equal plain autograd on that sample."""
    model = tiny_classifier()
    cb = CaptureCallback(str(tmp_path / "store"), "hf", score_at_end=False)
    trainer_for(model, tmp_path / "out", tmp_path / "store", "hf", [cb], gradient_accumulation_steps=4,
                learning_rate=0.0, num_train_epochs=1).train()  # fmt: skip
    visits = Store(tmp_path / "store").staging("capture-hf").read(VISITS).to_pandas()
    assert len(visits) == 24 and visits["sample_id"].is_unique
    assert sorted(visits["step"].unique()) == [1, 2, 3]  # 12 micro-batches of 2, 4 per optimiser step
    ds = sample_dataset()
    collate = _Tok().pad
    model.train()
    for _, row in visits.iterrows():
        feature = ds[int(row["sample_id"][2:])]
        batch = collate([{k: feature[k] for k in ("input_ids", "attention_mask", "labels")}])
        loss, norm = reference(model, batch)
        assert rel(row["loss"], loss) <= TOL and rel(row["grad_norm"], norm) <= TOL


class _Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise KeyboardInterrupt("killed mid-epoch")


def test_trainer_resume_no_duplicate_visits(tmp_path, prefect_harness):
    """Killed at step 7 of epoch 1 (record flushed every step, checkpoint at step 4); resumed from checkpoint-4:
    every sample is visited exactly once per epoch; then the scores are written and selectable."""
    store = tmp_path / "store"
    config = CaptureConfig(store=str(store), flush_every=1)
    common = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 4, "learning_rate": 1e-2}
    first = trainer_for(tiny_classifier(), tmp_path / "out", store, "r", [CaptureCallback(str(store), "r", config),
                        _Kill()], **common)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        first.train()
    staged = Store(store).staging("capture-r").read(VISITS)
    assert max(staged["step"].to_pylist()) == 7  # visits after the checkpoint were on disk
    cb = CaptureCallback(str(store), "r", config)
    trainer_for(tiny_classifier(), tmp_path / "out", store, "r", [cb], **common).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4")
    )
    visits = Store(store).run_table(VISITS, "capture-r").to_pandas()
    assert len(visits) == 48 and not visits.duplicated(["sample_id", "epoch"]).any()
    assert (visits.groupby("sample_id").size() == 2).all()
    assert cb.result["samples"] == 24
    from gradsift.storage.catalog import query

    scores = query(Store(store), "SELECT count(*) AS n, count(aum) AS a FROM scores WHERE run_id = 'capture-r'")
    assert scores.to_pylist() == [{"n": 24, "a": 24}]


def test_plain_loop_scores_from_run_cli(tmp_path):
    """A plain loop over 2 epochs, then ``gradsift scores from-run``: one scores row per sample, AUM as the mean
    recorded margin."""
    from typer.testing import CliRunner

    from gradsift.cli.commands import app
    from gradsift.storage.catalog import query

    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [batch_of(4, seed) for seed in range(3)]
    with capture(model, str(tmp_path), "loop", CaptureConfig(store=str(tmp_path), flush_every=2)) as rec:
        for epoch in (1, 2):
            for k, batch in enumerate(batches):
                out = model(**batch)
                out.loss.backward()
                rec.step([f"s{k}-{i}" for i in range(4)], out, step=(epoch - 1) * 3 + k + 1, epoch=epoch, lr=1e-3)
                opt.step()
                opt.zero_grad()
    out = CliRunner().invoke(app, ["scores", "from-run", "loop", "--store", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "12 samples scored from 24 visits" in out.output
    store = Store(tmp_path)
    scores = query(store, "SELECT sample_id, aum FROM scores WHERE run_id = 'capture-loop' ORDER BY sample_id")
    visits = query(store, "SELECT sample_id, avg(margin) AS m FROM capture_visits GROUP BY 1 ORDER BY 1")
    np.testing.assert_allclose(scores["aum"].to_numpy(), visits["m"].to_numpy(), rtol=1e-6)


def test_bf16_autocast_close(tmp_path):
    """bf16 autocast (CPU): the recorded norms are those of the bf16 step: within 2% of autograd's per-sample norms
    under the same autocast (bf16 matmuls carry 8 mantissa bits), and within 5% of float32 autograd."""
    model = tiny_classifier()
    batch = batch_of(4, 0)
    with capture(model, str(tmp_path), "bf16") as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        out.loss.backward()
        rec.step([f"s0-{i}" for i in range(4)], out)
    visits = Store(tmp_path).staging("capture-bf16").read(VISITS).to_pandas().sort_values("sample_id")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, norm16 = reference(model, batch)
    _, norm = reference(model, batch)
    assert rel(visits["grad_norm"], norm16) <= 2e-2 and rel(visits["loss"], loss16) <= 1e-2
    assert rel(visits["grad_norm"], norm) <= 5e-2


def test_compiled_model_refused(tmp_path):
    """torch.compile (a wrapper or in place) and the Trainer's torch_compile=True are refused with the reason."""
    in_place = tiny_classifier()
    in_place.compile()
    for model in (torch.compile(tiny_classifier()), in_place):
        with pytest.raises(NotImplementedError, match="torch.compile"), capture(model, str(tmp_path), "c"):
            pass
    cb = CaptureCallback(str(tmp_path / "store"), "c", score_at_end=False)
    trainer = trainer_for(tiny_classifier(), tmp_path / "out", tmp_path / "store", "c", [cb], torch_compile=True)
    with pytest.raises(NotImplementedError, match="without torch_compile"):
        trainer.train()


DDP_N, DDP_EPOCHS, DDP_WORLD = 9, 2, 2  # 9 samples: DistributedSampler repeats one to even out the two shards


def ddp_sample(i: int) -> dict:
    g = torch.Generator().manual_seed(100 + i)
    return {"input_ids": torch.randint(3, 50, (1, 7), generator=g), "labels": torch.tensor([i % 2])}


def ddp_shard(rank: int, epoch: int) -> list[int]:
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(DDP_N), num_replicas=DDP_WORLD, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    return list(sampler)


def ddp_worker(rank: int, store: str, rendezvous: str) -> None:
    """One rank of a 2-process gloo run: a DDP-wrapped classifier, its DistributedSampler shard, batches of 2."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=DDP_WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(tiny_classifier())
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the parent's reference sees the same weights
        step = 0
        with capture(model, store, "ddp", CaptureConfig(store=store, flush_every=2)) as rec:
            for epoch in range(1, DDP_EPOCHS + 1):
                shard = ddp_shard(rank, epoch)
                for k in range(0, len(shard), 2):
                    idx = shard[k : k + 2]
                    items = [ddp_sample(i) for i in idx]
                    batch = {key: torch.cat([it[key] for it in items]) for key in ("input_ids", "labels")}
                    out = model(**batch)
                    out.loss.backward()
                    step += 1
                    rec.step([("d", f"id{i}") for i in idx], out, step=step, epoch=epoch)
                    opt.step()
                    opt.zero_grad()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_each_rank_records_its_own_samples(tmp_path):
    """Two real processes (gloo): each rank writes parts of its own shard's visits; the scored record has every
    sample once per epoch (the sampler's repeat dropped), and each visit's gradient norm is that sample's own."""
    import torch.multiprocessing as mp

    store = str(tmp_path / "store")
    mp.spawn(ddp_worker, args=(store, str(tmp_path / "rendezvous")), nprocs=DDP_WORLD, join=True)
    staging = Store(store).staging("capture-ddp")
    names = {p.stem[:7] for p in staging.parts(VISITS)}
    assert names == {"rank000", "rank001"}
    visits = staging.read(VISITS).to_pandas()
    for rank in range(DDP_WORLD):
        for epoch in range(1, DDP_EPOCHS + 1):
            mine = visits[(visits["rank"] == rank) & (visits["epoch"] == epoch)]
            assert sorted(mine["sample_id"]) == sorted(f"id{i}" for i in ddp_shard(rank, epoch))
    kept = record_visits(staging.read(VISITS)).to_pandas()
    assert len(kept) == DDP_N * DDP_EPOCHS and not kept.duplicated(["sample_id", "epoch"]).any()
    model = tiny_classifier()
    for _, row in visits.iterrows():
        loss, norm = reference(model, ddp_sample(int(row["sample_id"][2:])))
        assert rel(row["loss"], loss) <= TOL and rel(row["grad_norm"], norm) <= TOL


def test_fused_linears_keep_the_step_gradient(tmp_path):
    """A small Llama at 9 tokens: the engine's cost rule materialises every projection, so they run fused
    (per-sample gradients summed as the weight gradient); with padding and accumulation 2 the step's parameter
    gradients equal those of the uncaptured step, and the recorded norms equal plain autograd."""
    from gradsift.capture.session import CaptureSession

    model = build_llama(LlamaShape(hidden=32, layers=1, intermediate=64))
    model.train()
    batches = [batch_of(3, seed, "causal_lm", vocab=260) for seed in range(2)]
    for batch in batches:
        (model(**batch).loss / 2).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    session = CaptureSession(model, str(tmp_path), "fused", require_ids=False)
    fused = {m.name for m in session.hooks.fusable}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"} <= fused
    for k, batch in enumerate(batches):
        (model(**batch).loss / 2).backward()
        session.record_step(1, 1, 0.0, [f"s{k}-{i}" for i in range(3)])
    session.close()
    assert not any("forward" in vars(m.module) for m in session.hooks.engine.mods)  # unpatched again
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)
    check_exact(model, batches, Store(tmp_path).staging("capture-fused").read(VISITS))
