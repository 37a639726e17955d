"""Benchmark: per-sample gradient engine vs a batched training step vs the naive per-sample loop.

Same random-init Llama and the same batch for every method. Warm-up, then the median of --repeats.
Prints a table, then (last line) one JSON object. Run from the repository root:

    PYTHONPATH=. python bench/persample.py                  # CPU config
    PYTHONPATH=. python bench/persample.py --preset 134m    # CUDA, bf16
    PYTHONPATH=. python bench/persample.py --preset 1b --seq 2048

Imports only torch, transformers and gradsift.engine / gradsift.models.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from gradsift.data.batching import Batch
from gradsift.engine.gradients import PerSampleGradients
from gradsift.models.adapter import per_sample_loss
from gradsift.models.loading import LlamaShape, build_llama
from gradsift.schemas.engine import EngineConfig

VERBOSE = False
PRESETS = {
    "cpu": dict(hidden=512, layers=4, heads=8, intermediate=1376, vocab=8192, seq=128, batch=16, dtype="float32",
                device="cpu"),
    "134m": dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000, seq=512, batch=16,
                 dtype="bfloat16", device="cuda"),
    "1b": dict(hidden=2048, layers=22, heads=16, intermediate=5632, vocab=32000, seq=512, batch=8,
               dtype="bfloat16", device="cuda"),
}  # fmt: skip


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    for key in ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch"):
        ap.add_argument(f"--{key}", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--device")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-samples", type=int, default=None, help="samples timed in the naive loop (extrapolated)")
    ap.add_argument("--verbose", action="store_true", help="print every repeat's time")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print the torch.profiler top operators (by self device time on CUDA, self CPU time on CPU) and "
        "the operator count of one training step and one engine call: where the engine's time above a step goes",
    )
    args = ap.parse_args()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak MiB, last result) after one warm-up call."""
    fn()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark
    if VERBOSE:
        print("  times:", " ".join(f"{t:.3f}" for t in times))
    return statistics.median(times), peak, out


def profile_table(name: str, fn, device: str, rows: int = 15) -> int:
    """One profiled call of ``fn`` after a warm-up: prints the operator count and the top ``rows`` operators;
    returns the count."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    count = sum(e.count for e in events)
    print(f"\n== profile: {name}: {count} operator calls")
    if rows:
        print(events.table(sort_by=key, row_limit=rows))
    return count


def main() -> None:
    global VERBOSE
    args = parse()
    VERBOSE = args.verbose
    dtype = getattr(torch, args.dtype)
    dev = args.device
    shape = LlamaShape(hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate,
                       vocab=args.vocab, max_positions=max(2048, args.seq))  # fmt: skip
    model = build_llama(shape, seed=0).to(device=dev, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)
    batch = Batch(ids, torch.ones_like(ids), ids.clone()).to(dev)
    n_params = sum(p.numel() for p in model.parameters())

    def train_step():
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_sample_loss(logits, batch.labels, "causal_lm").sum().backward()

    n_naive = args.naive_samples or (args.batch if dev == "cpu" else min(args.batch, 4))

    def naive():
        norms = []
        for i in range(n_naive):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch.input_ids[i : i + 1]).logits
            per_sample_loss(logits, batch.labels[i : i + 1], "causal_lm").sum().backward()
            norms.append(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters())))
        return torch.stack(norms).cpu()

    eng = PerSampleGradients(model, EngineConfig(feature_dim=8192, micro_batch_size=args.batch))
    nuc = PerSampleGradients(
        model,
        EngineConfig(feature_dim=0, layer_stats=False, micro_batch_size=args.batch,
                     nuclear_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )  # fmt: skip

    train_s, train_mem, _ = timed(train_step, dev, args.repeats)
    naive_part_s, naive_mem, naive_norms = timed(naive, dev, args.repeats)
    naive_s = naive_part_s * args.batch / n_naive
    model.zero_grad(set_to_none=True)
    engine_s, engine_mem, res = timed(lambda: eng.compute(batch), dev, args.repeats)
    nuclear_s, nuclear_mem, _ = timed(lambda: nuc.compute(batch), dev, args.repeats)
    rel = ((res.grad_norm[:n_naive].double() - naive_norms.double()).abs() / naive_norms.double()).max().item()

    b = args.batch
    rows = [
        ("training step (fwd+bwd, weight grads)", train_s, train_mem),
        (f"naive per-sample loop (batch 1; {n_naive}/{b} samples timed, extrapolated)", naive_s, naive_mem),
        ("engine: loss, grad_norm, layer norms, features 8192", engine_s, engine_mem),
        ("engine: nuclear norms q/k/v/o (+loss, grad_norm)", nuclear_s, nuclear_mem),
    ]
    print(f"model: {n_params / 1e6:.1f}M params, {vars(args)}; torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, device {torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}")  # fmt: skip
    print(f"{'method':<78} {'s/batch':>9} {'samples/s':>10} {'x train':>8} {'peak MiB':>9}")
    for name, s, mem in rows:
        print(f"{name:<78} {s:9.3f} {b / s:10.2f} {s / train_s:8.2f} {mem:9.0f}")
    print(f"engine grad_norm vs naive loop: max rel err {rel:.2e}")
    if args.profile:
        profile_table("training step", train_step, dev)
        profile_table("engine (default features)", lambda: eng.compute(batch), dev)
    print(json.dumps({
        "engine_over_train_step": engine_s / train_s,
        "naive_over_engine": naive_s / engine_s,
        "max_rel_err": rel,
        "train_step_s": train_s,
        "naive_s": naive_s,
        "naive_extrapolated_from": n_naive,
        "engine_s": engine_s,
        "nuclear_s": nuclear_s,
        "tokens_per_s": b * args.seq / engine_s,
        "peak_mem_mb": {"train": train_mem, "naive": naive_mem, "engine": engine_mem, "nuclear": nuclear_mem},
        "params": n_params,
        "config": vars(args),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
