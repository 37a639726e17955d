"""Issue 5, real data: LESS / TracIn / cosine on a three-domain mixture with gsm8k test as the target.

Steps (each resumable: a completed flow run with the same config is not redone):
1. prep: subsample alpaca_demo, code_alpaca_2k and gsm8k/train (<= --per-domain rows each, records of at
   most --max-chars characters) into one prompt/response/domain JSONL; gsm8k/test -> --targets target rows
   and another --targets held-out rows (disjoint), all under --work (never in the repository);
2. base: a random-init Llama (--hidden, --layers, byte tokenizer) fitted on the mixture with the train
   flow (all weights, 1 epoch), so that LoRA starts from a model that has seen the data (as LESS warms up
   a pretrained model); its last checkpoint folder is the base model of step 3;
3. lora: the train flow with LoRA adapters on the base (--epochs checkpoints with optimizer state);
4. influence: the influence flow (LESS, TracIn, cosine) on those checkpoints with the target rows, the top
   5% LESS selection, mixture weights and the report;
5. retrain: from the same base and LoRA init, train on the LESS top 5% and on random 5% draws of the same
   pool (same steps), then the mean target loss on the held-out gsm8k test rows (training.loop.evaluate).

Usage: .venv/bin/python bench/less_gsm8k.py --data ../shared/data --work /tmp/gs5-less
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from gradsift.env import configure_environment

configure_environment()


def _gsm8k(path: Path, domain: str, max_chars: int) -> tuple[int, list[dict]]:
    """(records in the file, prompt/response rows of at most ``max_chars`` characters) of a gsm8k split."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [
        {"prompt": f"Question: {r['question']}\nAnswer: ", "response": r["answer"], "domain": domain}
        for r in recs
        if len(r["question"]) + len(r["answer"]) + 19 <= max_chars
    ]
    return len(recs), rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prep(data: Path, work: Path, per_domain: int, targets: int, max_chars: int, seed: int) -> dict:
    rng = random.Random(seed)
    out: list[dict] = []
    counts = {}
    for domain, name in (("general", "alpaca_demo.json"), ("code", "code_alpaca_2k.json")):
        recs = json.loads((data / "sft_mix" / name).read_text())
        rows = []
        for r in recs:
            prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "") + "\n"
            if len(prompt) + len(r["output"]) <= max_chars:
                rows.append({"prompt": prompt, "response": r["output"], "domain": domain})
        rng.shuffle(rows)
        out += rows[:per_domain]
        counts[domain] = (len(recs), len(rows), min(per_domain, len(rows)))
    n_recs, rows = _gsm8k(data / "gsm8k/train.jsonl", "math", max_chars)
    rng.shuffle(rows)
    out += rows[:per_domain]
    counts["math"] = (n_recs, len(rows), min(per_domain, len(rows)))
    rng.shuffle(out)
    _, test = _gsm8k(data / "gsm8k/test.jsonl", "target", max_chars)
    rng.shuffle(test)
    work.mkdir(parents=True, exist_ok=True)
    _write_jsonl(work / "mixture.jsonl", out)
    _write_jsonl(work / "gsm8k_target.jsonl", test[:targets])
    _write_jsonl(work / "gsm8k_heldout.jsonl", test[targets : 2 * targets])
    return {"domains (records, <= max_chars, used)": counts, "target": targets, "heldout": targets}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--work", default="/tmp/gs5-less")
    ap.add_argument("--per-domain", type=int, default=1000)
    ap.add_argument("--targets", type=int, default=200)
    ap.add_argument("--max-chars", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4, help="LoRA epochs (one checkpoint each)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--feature-dim", type=int, default=2048)
    ap.add_argument("--retrain-epochs", type=int, default=6)
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--base-run", default=None, help="reuse this completed train run as the base (skip step 2)")
    ap.add_argument("--lora-run", default=None, help="reuse this completed LoRA train run (skip step 3)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    import numpy as np

    from gradsift.flows.influence import influence_flow
    from gradsift.flows.train import train as train_run
    from gradsift.models.checkpoints import list_checkpoints
    from gradsift.models.loading import LlamaShape, build_llama, byte_tokenizer
    from gradsift.schemas.config import NightlyConfig
    from gradsift.schemas.train import TrainConfig
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store
    from gradsift.training.loop import evaluate, train
    from gradsift.training.proxy import TrainData, build_proxy, rebind

    work = Path(args.work)
    store_dir = work / "store"
    t0 = time.perf_counter()
    info = prep(Path(args.data), work, args.per_domain, args.targets, args.max_chars, seed=0)
    print("prep", json.dumps(info), flush=True)
    max_len = args.max_chars + 40

    init = work / "model-init"
    if not (init / "config.json").exists():
        build_llama(
            LlamaShape(hidden=args.hidden, layers=args.layers, heads=4, intermediate=2 * args.hidden)
        ).save_pretrained(init)
        byte_tokenizer().save_pretrained(init)
    mixture = {"path": str(work / "mixture.jsonl"), "dataset": "mixture"}
    common = {"store": str(store_dir), "data": mixture, "task": "causal_lm", "max_length": max_len}
    common |= {"batch_size": args.batch, "schedule": "constant", "score_batch_size": 32}
    base_cfg = TrainConfig(model=str(init), epochs=1, lr=3e-3, warmup_ratio=0.05, **common)
    base_run = args.base_run or train_run(base_cfg)["run_id"]
    base = list_checkpoints(store_dir, base_run)[-1].path / "model"
    print(f"base: run {base_run} -> {base} ({time.perf_counter() - t0:.0f}s)", flush=True)

    lora_cfg = TrainConfig(model=str(base), epochs=args.epochs, lr=1e-3, lora=True, lora_r=8, **common)
    lora_run = args.lora_run or train_run(lora_cfg)["run_id"]
    cks = list_checkpoints(store_dir, lora_run)
    print(f"lora: run {lora_run}, checkpoints {[(c.step, c.lr) for c in cks]} ({time.perf_counter() - t0:.0f}s)")

    icfg = NightlyConfig.model_validate(
        {
            "store": str(store_dir),
            "model": {"name_or_path": str(base), "max_tokens": max_len},
            "ingest": {
                "sources": [
                    mixture,
                    {"path": str(work / "gsm8k_target.jsonl"), "dataset": "gsm8k_test"},
                ]
            },
            "target": {
                "name": "gsm8k",
                "datasets": ["gsm8k_test"],
                "methods": ["less", "tracin", "cosine"],
                "checkpoints": {"train_run": lora_run},
                "feature_dim": args.feature_dim,
                "select_fraction": 0.05,
            },
            "mixture": {},
            "ray": {"num_actors": 1},
        }
    )
    res = influence_flow(icfg)
    irun = res["run_id"]
    print(f"influence: run {irun} {res['status']} ({time.perf_counter() - t0:.0f}s)", flush=True)
    store = Store(store_dir)
    top_share = query(
        store,
        """SELECT i.method, count(*) AS n_top, avg((s.domain = 'math')::INT) AS math_share,
                   avg((s.domain = 'code')::INT) AS code_share, avg((s.domain = 'general')::INT) AS general_share
            FROM influence i JOIN (SELECT DISTINCT dataset, sample_id, domain FROM samples) s
                 USING (dataset, sample_id)
            WHERE i.run_id = $run AND i.rank < (SELECT 0.05 * count(*) FROM influence
                  WHERE run_id = $run AND method = i.method)
            GROUP BY i.method ORDER BY i.method""",
        {"run": irun},
    ).to_pylist()
    weights = query(store, "SELECT * EXCLUDE (run_id) FROM mixtures WHERE run_id = $run ORDER BY domain", {"run": irun})
    print("top 5% domain shares", json.dumps(top_share), flush=True)
    print("mixture weights", json.dumps(weights.to_pylist(), default=float), flush=True)

    # Retrain on the LESS top 5% vs random 5% of the same pool, from the same base and LoRA init.
    rows = store.run_table("samples", irun).to_pylist()
    pool = [r for r in rows if r["dataset"] == "mixture"]
    heldout_rows = []
    for i, line in enumerate((work / "gsm8k_heldout.jsonl").read_text().splitlines()):
        r = json.loads(line)
        heldout_rows.append({"dataset": "heldout", "sample_id": str(i), "label": None, "text": None} | r)
    sel = (
        query(
            store,
            "SELECT sample_id FROM selections WHERE run_id = $run AND selection LIKE '%less-top%' AND kept",
            {"run": irun},
        )
        .column("sample_id")
        .to_pylist()
    )
    n_keep = len(sel)
    ids = np.array([r["sample_id"] for r in pool])
    re_cfg = lora_cfg.model_copy(update={"epochs": args.retrain_epochs, "batch_size": 8})
    heldout = TrainData(heldout_rows, None)

    def fit_eval(kept: set, seed: int) -> float:
        data = TrainData(pool, None).subset(np.isin(ids, list(kept)))
        proxy, _ = train(re_cfg, str(base), data, seed)
        return evaluate(rebind(proxy, re_cfg, heldout))[1]

    before = evaluate(build_proxy(re_cfg, str(base), heldout, 0, None))[1]  # LoRA B = 0: the base model
    results = {"n_keep": n_keep, "heldout_loss_base": before, "less": [], "random": [], "random_math_share": []}
    dom = {r["sample_id"]: r["domain"] for r in pool}
    for seed in range(args.random_seeds):
        results["less"].append(fit_eval(set(sel), seed))
        rnd = set(np.random.default_rng(100 + seed).choice(ids, n_keep, replace=False).tolist())
        results["random"].append(fit_eval(rnd, seed))
        results["random_math_share"].append(float(np.mean([dom[i] == "math" for i in rnd])))
        print(f"retrain seed {seed}: {json.dumps(results)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    results["less_mean"] = float(np.mean(results["less"]))
    results["random_mean"] = float(np.mean(results["random"]))
    summary = {
        "prep": info,
        "base_run": base_run,
        "lora_run": lora_run,
        "checkpoints": [(c.step, c.lr) for c in cks],
        "influence_run": irun,
        "top5": top_share,
        "mixture": weights.to_pylist(),
        "retrain": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print("SUMMARY", json.dumps(summary, default=float), flush=True)


if __name__ == "__main__":
    main()
