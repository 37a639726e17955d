"""Entanglement over all hh-rlhf harmless pairs and fast/slow layer curves on 500 gsm8k problems.

Model: a random-init Llama (hidden 128, 6 layers, byte tokenizer) saved to a local folder, since no
pretrained causal LM installs offline. Usage: .venv/bin/python bench/analyses.py --data ../shared/data --store /tmp/gs-an
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
    args = ap.parse_args()

    from gradsift.flows.analyze import analyze_flow
    from gradsift.schemas.config import AnalyzeConfig
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store
    from gradsift.tasks.models import LlamaShape, build_llama, byte_tokenizer

    folder = Path(args.store) / "model-h128-l6"
    if not (folder / "config.json").exists():
        build_llama(LlamaShape(hidden=128, layers=6, heads=4, intermediate=256)).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
    data = Path(args.data)
    model = {"name_or_path": str(folder), "max_tokens": args.max_tokens}
    for kind, path, section in (
        ("pairs", data / "hh_rlhf_harmless/test.jsonl.gz", {"limit": args.pairs}),
        ("fast_slow", data / "gsm8k/test.jsonl", {"limit": args.problems}),
    ):
        start = time.perf_counter()
        cfg = AnalyzeConfig(store=args.store, data=str(path), model=model, **{kind: section})
        result = analyze_flow(cfg)
        print(f"{kind}: {result['status']} in {time.perf_counter() - start:.1f}s, report {result.get('report')}")
    store = Store(args.store)
    sql = (
        "SELECT count(*) AS pairs, avg(cosine) AS mean_cos, median(condition_ratio) AS median_ratio, "
        "avg((condition_ratio > 1)::INT) AS frac_ratio_gt_1, avg((dot > 0)::INT) AS frac_dot_pos, "
        "avg(norm_chosen) AS norm_w, avg(norm_rejected) AS norm_l FROM pair_scores"
    )
    print(query(store, sql).to_pandas().to_string())
    print(query(store, "SELECT * FROM layer_diffs ORDER BY module, part").to_pandas().to_string())
    print(
        query(store, "SELECT variant, module, layer, nuclear_norm FROM layer_curves ORDER BY 2, 1, 3")
        .to_pandas()
        .to_string()
    )


if __name__ == "__main__":
    main()
