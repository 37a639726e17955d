"""Entanglement over all hh-rlhf harmless pairs and fast/slow layer curves on 500 gsm8k problems.

Model: a random-init Llama (hidden 128, 6 layers, byte tokenizer) saved to a local folder, since no
pretrained causal LM installs offline. Usage: .venv/bin/python bench/analyses.py --data ../shared/data --store /tmp/gs-an
[--only pairs|fast_slow] [--micro-batch 4] [--projected] [--actors 1] [--docs docs]

Memory on a small CPU box: each Ray task holds micro_batch x parameters float32 materialised gradients
(exact) plus activations of micro_batch x max_tokens; --micro-batch 4 --max-tokens 256 --actors 1 keeps
the pairs run to one worker of a few hundred MB. Pairs longer than --max-tokens keep the prompt end and the response start;
the script reports how many were cut. --docs copies the report PNGs there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gradsift.env import configure_environment

configure_environment()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--store", default="/tmp/gradsift-analyses")
    ap.add_argument("--pairs", type=int, default=None, help="first N pairs (default: all)")
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--only", choices=["pairs", "fast_slow"], default=None)
    ap.add_argument("--micro-batch", type=int, default=16, help="samples per forward/backward (pairs: 2 per pair)")
    ap.add_argument("--projected", action="store_true", help="pairs: dot products from projected features")
    ap.add_argument("--actors", type=int, default=2, help="Ray CPUs (concurrent pair chunks / variants)")
    ap.add_argument("--docs", default=None, help="copy the report PNGs to this folder")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()

    from gradsift.flows.analyze import analyze
    from gradsift.models.loading import LlamaShape, build_llama, byte_tokenizer
    from gradsift.schemas.config import AnalyzeConfig
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store

    folder = Path(args.store) / f"model-h{args.hidden}-l{args.layers}"
    if not (folder / "config.json").exists():
        shape = LlamaShape(hidden=args.hidden, layers=args.layers, heads=4, intermediate=2 * args.hidden)
        build_llama(shape).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
    data = Path(args.data)
    model = {"name_or_path": str(folder), "max_tokens": args.max_tokens}
    if args.actors:
        import ray

        ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False, configure_logging=False)
    kinds = (
        ("pairs", data / "hh_rlhf_harmless/test.jsonl.gz", {"limit": args.pairs, "exact": not args.projected}),
        ("fast_slow", data / "gsm8k/test.jsonl", {"limit": args.problems}),
    )
    for kind, path, section in kinds:
        if args.only and kind != args.only:
            continue
        start = time.perf_counter()
        engine = {"micro_batch_size": args.micro_batch}
        cfg = AnalyzeConfig(
            store=args.store,
            data=str(path),
            model=model,
            score={"engine": engine},
            ray={"num_actors": args.actors},
            **{kind: {k: v for k, v in section.items() if v is not None}},
        )
        if kind == "pairs":
            _count_cut(cfg, folder)
        result = analyze(cfg)
        print(f"{kind}: {result['status']} in {time.perf_counter() - start:.1f}s, report {result.get('report')}")
        if args.docs and result.get("report"):
            import shutil

            for png in Path(result["report"]).parent.glob("*.png"):
                shutil.copy(png, Path(args.docs) / f"issue5_{kind}_{png.name}")
    store = Store(args.store)
    sql = (
        "SELECT count(*) AS pairs, avg(cosine) AS mean_cos, median(condition_ratio) AS median_ratio, "
        "avg((condition_ratio > 1)::INT) AS frac_ratio_gt_1, avg((dot > 0)::INT) AS frac_dot_pos, "
        "avg(norm_chosen) AS norm_w, avg(norm_rejected) AS norm_l FROM pair_scores"
    )
    if args.only != "fast_slow":
        print(query(store, sql).to_pandas().to_string())
        deciles = (
            "SELECT quantile_cont(condition_ratio, [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]) AS ratio_q, "
            "quantile_cont(cosine, [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]) AS cos_q, median(cosine) AS median_cos "
            "FROM pair_scores"
        )
        print(query(store, deciles).to_pylist())
    if args.only != "pairs":
        print(query(store, "SELECT * FROM layer_diffs ORDER BY module, part").to_pandas().to_string())
        print(
            query(store, "SELECT variant, module, layer, nuclear_norm FROM layer_curves ORDER BY 2, 1, 3")
            .to_pandas()
            .to_string()
        )


def _count_cut(cfg, folder: Path) -> None:
    """How many pairs are longer than max_tokens (they keep the prompt's end and the responses' start)."""
    from gradsift.flows.analyze import pair_rows
    from gradsift.models.loading import load_tokenizer
    from gradsift.signals.entanglement import encode_pair

    tok, n = load_tokenizer(str(folder)), cfg.model.max_tokens
    rows, bad = pair_rows(cfg)
    cut = sum(encode_pair(tok, p, c, r, n)[2] for _, p, c, r in rows)
    print(f"pairs: {len(rows)} ({len(bad)} rows quarantined), truncated to {n} tokens: {cut} ({cut / len(rows):.1%})")


if __name__ == "__main__":
    main()
