"""Benchmark: gradsift's per-sample gradient norms against the peers, side by side (issue 16).

One process, methods interleaved (every repeat times each method once, in turn), the same random-init Llama
and batch, fp32: a batched training step, gradsift (norms of every parameter, the default; norms of the
blocks' Linear layers only, ``parameters=block_linear``; those norms plus projected features of the same
total size as Bergson's, 16 x 16 per module), Bergson (its own hooks, 16 x 16 projection per module), Opacus
ghost clipping, torch.func vmap and the naive per-sample loop.
The peers cover the blocks' Linear layers, so every method but "gradsift (all)" is timed on that set and
its norms are compared against the naive loop's on it. Peers are optional (``pip install .[bench]``); a
missing or unusable one is skipped with a message. Last line: one JSON object, per size
``gradsift_over_bergson``, ``gradsift_over_opacus``, ``gradsift_over_train_step``, ``max_rel_err``.

    PYTHONPATH=. python bench/peers.py [--sizes 21m-128x16 21m-512x8 134m-128x8] [--repeats 3] [--profile]
    PYTHONPATH=. python bench/peers.py --device cuda --dtype bfloat16 --sizes 134m-512x16 --naive-samples 2 \\
        --skip torch.func    # the GPU rows of bench/gpu.sh
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from persample import profile_table, sync
from torch import nn

from gradsift.data.batching import Batch
from gradsift.engine.gradients import PerSampleGradients
from gradsift.models.adapter import per_sample_loss
from gradsift.models.loading import LlamaShape, build_llama
from gradsift.schemas.engine import EngineConfig

SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=512),  # a smoke test
    "21m": dict(hidden=512, layers=4, heads=8, intermediate=1376, vocab=8192),
    "134m": dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000),
    "1b": dict(hidden=2048, layers=22, heads=16, intermediate=5632, vocab=32000),  # 1.26B, persample.py's preset
}
SIZES = ("21m-128x16", "21m-512x8", "134m-128x8")
Method = Callable[[], torch.Tensor | None]


def block_linears(model: nn.Module) -> dict[str, nn.Parameter]:
    """The blocks' Linear weights (the peers' coverage; gradsift's ``parameters=block_linear``)."""
    return {
        f"{n}.weight": m.weight
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(part.isdigit() for part in n.split("."))
    }


def only(model: nn.Module, params: dict[str, nn.Parameter] | None) -> None:
    """requires_grad on ``params`` only (None: on every parameter)."""
    keep = None if params is None else {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(keep is None or id(p) in keep)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(model(input_ids=ids).logits, ids, "causal_lm")


def methods(model: nn.Module, ids: torch.Tensor, naive_samples: int | None = None) -> dict[str, Method]:
    """Each method as a call returning its per-sample norms over the block Linear weights (or None); the naive
    loop runs the first ``naive_samples`` samples (all by default)."""
    linear = block_linears(model)
    batch = Batch(ids, torch.ones_like(ids), ids.clone())

    def train_step() -> None:
        only(model, None)
        model.zero_grad(set_to_none=True)
        loss_of(model, ids).sum().backward()

    def naive() -> torch.Tensor:
        only(model, linear)
        norms = []
        for i in range(naive_samples or len(ids)):
            model.zero_grad(set_to_none=True)
            loss_of(model, ids[i : i + 1]).sum().backward()
            norms.append(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in linear.values())))
        return torch.stack(norms)

    def engine(parameters: str, feature_dim: int) -> Method:
        only(model, None)
        eng = PerSampleGradients(model, EngineConfig(parameters=parameters, feature_dim=feature_dim,
                                                     layer_stats=False, micro_batch_size=len(ids)))  # fmt: skip

        def run() -> torch.Tensor:
            only(model, None)
            return eng.compute(batch).grad_norm

        return run

    out = {
        "training step": train_step,
        "gradsift norms (all params)": engine("all", 0),
        "gradsift norms": engine("block_linear", 0),
        f"gradsift norms + {16 * 16 * len(linear)}-d features": engine("block_linear", 16 * 16 * len(linear)),
    }
    for name, make in (("Bergson, proj 16/module", bergson), ("Opacus ghost clipping", opacus),
                       ("torch.func vmap", vmap)):  # fmt: skip
        try:
            out[name] = make(model, ids, linear)
        except Exception as err:  # noqa: BLE001 - an optional peer that cannot run here is reported and skipped
            print(f"skipped {name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    out["naive loop"] = naive
    return out


def bergson(model: nn.Module, ids: torch.Tensor, linear: dict) -> Method:
    """Bergson's own hooks (``TraceCollector``), loss and backward (``fwd_bwd_factory``), set up as its worker
    does (weights frozen, input embeddings trainable), 16x16 projection per module. The first call also runs it
    unprojected (norms of the full per-sample gradients, for the exactness column) and is not timed."""
    from bergson.collector.collector import fwd_bwd_factory
    from bergson.collector.gradient_collectors import TraceCollector
    from bergson.config import IndexConfig
    from bergson.gradients import GradientProcessor

    class NormCollector(TraceCollector):
        def backward_hook(self, module: nn.Module, g: torch.Tensor) -> None:
            self.mod_grads[module._name].append(self._compute_gradient(module, g).pow(2).sum(1))

    targets = {n.removesuffix(".weight") for n in linear}
    fwd_bwd = fwd_bwd_factory(IndexConfig(run_path="unused", loss_reduction="mean"))
    kw = dict(model=model, target_modules=targets, device=ids.device, dtype=torch.float32)
    proj = TraceCollector(processor=GradientProcessor(projection_dim=16), **kw)
    first = [True]

    def step(collector) -> None:
        model.requires_grad_(False)
        model.get_input_embeddings().requires_grad_(True)
        collector.mod_grads.clear()
        with collector:
            fwd_bwd(model, ids, ids, {})

    def run() -> torch.Tensor | None:
        step(proj)
        if not first[0]:
            return None
        first[0] = False
        exact = NormCollector(processor=GradientProcessor(projection_dim=0), **kw)
        step(exact)
        return torch.sqrt(sum(v[0] for v in exact.mod_grads.values()))

    return run


def opacus(model: nn.Module, ids: torch.Tensor, linear: dict) -> Method:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = copy.deepcopy(model)  # its hooks stay on the model (and break torch.func): a copy of the same weights
    linear = block_linears(model)
    only(model, linear)  # Opacus validates every module with trainable parameters (it has no RMSNorm sampler)
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", use_ghost_clipping=True)
    gsm.disable_hooks()

    def run() -> torch.Tensor:
        only(model, linear)
        gsm.enable_hooks()
        gsm.train()
        model.zero_grad(set_to_none=True)
        try:
            per_sample_loss(gsm(input_ids=ids).logits, ids, "causal_lm").sum().backward()
            return gsm.get_norm_sample().detach()
        finally:
            gsm.disable_hooks()

    return run


def vmap(model: nn.Module, ids: torch.Tensor, linear: dict) -> Method:
    from torch.func import functional_call, grad
    from torch.func import vmap as vmap_

    names = list(linear)

    def one(params: dict, sample: torch.Tensor) -> torch.Tensor:
        return loss_of_params(params, sample[None]).sum()

    def loss_of_params(params: dict, x: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(functional_call(model, params, (x,)).logits, x, "causal_lm")

    def run() -> torch.Tensor:
        only(model, None)
        params = {n: linear[n].detach() for n in names}
        grads = vmap_(grad(one), in_dims=(None, 0))(params, ids)
        return torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads.values()))

    return run


def run_size(size: str, repeats: int, device: str = "cpu", dtype: str = "float32", naive_samples: int | None = None,
             skip: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """One size ("21m-128x16": shape, seq x batch): every method but those starting with a ``skip`` entry,
    interleaved; prints the table and returns the size's JSON entry (peak MiB per method on CUDA)."""
    shape_name, dims = size.split("-")
    seq, batch = (int(x) for x in dims.split("x"))
    shape = SHAPES[shape_name]
    model = build_llama(LlamaShape(**shape, max_positions=max(2048, seq)), seed=0).to(device, getattr(torch, dtype))
    ids = torch.randint(3, shape["vocab"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    todo = {n: fn for n, fn in methods(model, ids, naive_samples).items() if not n.startswith(skip)}
    times: dict[str, list[float]] = {name: [] for name in todo}
    norms: dict[str, torch.Tensor | None] = {}
    peak: dict[str, float] = {}
    for name, fn in list(todo.items()):
        try:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            norms[name] = fn()  # warm-up, and the norms compared
            sync(device)
            if device.startswith("cuda"):
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as err:  # noqa: BLE001 - a peer failing on this model is reported and skipped
            print(f"skipped {name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            del todo[name], times[name]
    for _ in range(repeats):
        for name, fn in todo.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    err = {}
    if "naive loop" in norms:
        ref = norms["naive loop"].double().cpu()
        err = {n: ((v[: len(ref)].double().cpu() - ref).abs() / ref).max().item() for n, v in norms.items()
               if v is not None and n != "gradsift norms (all params)"}  # fmt: skip
    if "naive loop" in med and len(ref) < batch:  # timed on a subset: extrapolated to the batch
        med["naive loop"] *= batch / len(ref)
    step = med["training step"]
    print(f"\n{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, seq {seq} x batch {batch}, "
          f"{device} {dtype}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| method | s/batch | x train step | max rel err vs naive | peak MiB |\n|---|---|---|---|---|")
    for name, sec in med.items():
        e = f"{err[name]:.1e}" if name in err else ""
        print(f"| {name} | {sec:.3f} | {sec / step:.2f} | {e} | {peak.get(name, float('nan')):.0f} |")
    ours = med.get("gradsift norms")

    def over(peer: str) -> float | None:
        return ours / med[peer] if ours and peer in med else None

    return {
        "gradsift_over_bergson": over("Bergson, proj 16/module"),
        "gradsift_over_opacus": over("Opacus ghost clipping"),
        "gradsift_over_train_step": over("training step"),
        "gradsift_all_over_train_step": med["gradsift norms (all params)"] / step if "gradsift norms (all params)" in med else None,
        "max_rel_err": max((v for n, v in err.items() if n.startswith("gradsift")), default=None),
        "x_train_step": {n: sec / step for n, sec in med.items()},
        "seconds": med,
        "peak_mib": peak,
    }  # fmt: skip


def operator_counts() -> dict:
    """Profiler operator calls of one training step and one call of each gradsift variant, 12-layer model, CPU."""
    model = build_llama(LlamaShape(**SHAPES["134m"], max_positions=2048), seed=0)
    ids = torch.randint(3, SHAPES["134m"]["vocab"], (2, 32), generator=torch.Generator().manual_seed(0))
    todo = methods(model, ids)
    names = ["training step", *(n for n in todo if n.startswith("gradsift"))]
    counts = {name: profile_table(name, todo[name], "cpu", rows=0) for name in names}
    step = counts["training step"]
    return {"calls": counts, "over_train_step": {n: c / step for n, c in counts.items()},
            "engine_over_train_step": counts["gradsift norms"] / step}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--naive-samples", type=int, default=None, help="samples of the naive loop (default: all)")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out (name prefixes, e.g. 'torch.func')")
    ap.add_argument("--profile", action="store_true", help="also the operator counts (12-layer model)")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}")  # fmt: skip
    result = {size: run_size(size, args.repeats, args.device, args.dtype, args.naive_samples, tuple(args.skip))
              for size in args.sizes}  # fmt: skip
    if args.profile:
        result["operator_counts"] = operator_counts()
    result["load_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
