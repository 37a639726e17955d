"""Score-based pruning and planted label noise on AG News (or SST-2) with MiniLM, frozen or fine-tuned.

Runs the project's own flows: ``train`` (frozen encoder, head trained with per-visit dynamics,
--proxy-seeds seeds on Ray) -> ``select`` (per score, drop easy, stratified by label; random baseline) ->
``evaluate`` (retrain from the same start on every selection, 3 seeds, held-out accuracy), then a
second ``train`` on a copy of the training file with 10% of labels flipped (seeded) and the AUROC
with which each score ranks the flipped samples first. Prints a table and JSON; writes the plot.

    .venv/bin/python bench/pruning.py --work /tmp/gs-bench --embed-cache /tmp/gs-emb/cache \\
        --data ../shared/data/agnews --plot docs/pruning_agnews.png

Everything written (store, noisy copy, embedding cache) goes under --work / --embed-cache, never
into the repository. Embedding 17.6k AG News texts takes about 5 minutes on 2 cores, once.

With ``--finetune-rows N`` the same study fine-tunes all MiniLM weights on the first N training rows
(a CPU-sized subset; ``--eval-rows`` samples the held-out set, ``--max-length`` cuts the tokens);
``--noise-only`` skips the pruning curve.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from gradsift.env import configure_environment

configure_environment()

SCORES = ("el2n", "forgetting", "aum", "vog", "self_influence")


def read_tsv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open(newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))


def write_tsv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n").writerows(rows)
    return path


def subset_copy(src: Path, dst: Path, n: int, header: bool, sample_seed: int | None = None) -> Path:
    """Copy a TSV keeping its first ``n`` rows, or ``n`` rows sampled with ``sample_seed`` (in file order)."""
    rows = read_tsv(src)
    head, body = rows[:header], rows[header:]
    if sample_seed is None:
        return write_tsv(dst, head + body[:n])
    keep = np.sort(np.random.default_rng(sample_seed).choice(len(body), size=min(n, len(body)), replace=False))
    return write_tsv(dst, head + [body[i] for i in keep])


def noisy_copy(src: Path, dst: Path, rate: float, seed: int, label_col: int, header: bool) -> set[int]:
    """Copy a TSV flipping ``rate`` of the labels to another class (seeded); returns the flipped lines."""
    rows = read_tsv(src)
    body = rows[1:] if header else rows
    labels = sorted({r[label_col] for r in body})
    rng = np.random.default_rng(seed)
    flipped = set()
    for i, row in enumerate(body):
        if rng.random() < rate:
            row[label_col] = rng.choice([x for x in labels if x != row[label_col]])
            flipped.add(i + 1 + header)
    write_tsv(dst, rows)
    return flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/agnews"))
    parser.add_argument("--work", type=Path, required=True, help="Store and noisy copy go here.")
    parser.add_argument("--embed-cache", type=Path, required=True, help="Embedding cache folder (outside the repo).")
    parser.add_argument("--plot", type=Path, default=Path("docs/pruning_agnews.png"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--head-hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=3, help="Retraining seeds and random selections per fraction.")
    parser.add_argument(
        "--proxy-seeds",
        type=int,
        default=0,
        help="Proxy-training seeds whose scores are averaged (EL2N, AUM, ...; Paul et al. average over 10); "
        "default: --seeds.",
    )
    parser.add_argument(
        "--finetune-rows",
        type=int,
        default=0,
        help="Full fine-tuning of all MiniLM weights on the first N training rows instead of a head on the frozen "
        "encoder.",
    )
    parser.add_argument(
        "--eval-rows", type=int, default=0, help="Evaluate on this many held-out rows (seeded sample; default all)."
    )
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per sample (fine-tuning cost).")
    parser.add_argument("--noise-only", action="store_true", help="Only the planted label-noise study.")
    parser.add_argument("--no-noise", action="store_true", help="Only the pruning curve.")
    parser.add_argument(
        "--fractions", default="0.85,0.7,0.55,0.4", help="Fractions kept on the curve (comma-separated)."
    )
    parser.add_argument("--scores", default=",".join(SCORES), help="Scores on the curve (comma-separated).")
    parser.add_argument(
        "--budget",
        choices=["epochs", "steps"],
        default="epochs",
        help="Retraining budget of the evaluation: the same epochs for every selection, or the same optimiser steps.",
    )
    parser.add_argument(
        "--no-gradient-scores",
        action="store_true",
        help="Proxy training without GraNd, VoG and self-influence (forward and dynamics scores only).",
    )
    parser.add_argument(
        "--aum-threshold-samples",
        action="store_true",
        help="Label-noise study only, with AUM threshold samples (Pleiss et al.): also the precision and recall "
        "of the samples flagged below the threshold.",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    from gradsift.flows.evaluate import evaluate as evaluate_run
    from gradsift.flows.select import select_flow
    from gradsift.flows.train import train as train_run
    from gradsift.schemas.train import EvaluateConfig, SelectConfig, TrainConfig

    sst2 = args.data.name == "sst2"
    source = {"columns": None, "text": "sentence"} if sst2 else {"columns": ["text", "label"]}
    train_file, eval_file = args.data / "train.tsv", args.data / ("dev.tsv" if sst2 else "test.tsv")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.finetune_rows:
        train_file = subset_copy(train_file, args.work / f"train{args.finetune_rows}.tsv", args.finetune_rows, sst2)
    if args.eval_rows:
        eval_file = subset_copy(eval_file, args.work / f"eval{args.eval_rows}.tsv", args.eval_rows, sst2, 0)
    store = str(args.work / "store")
    seeds = list(range(args.seeds))
    proxy_seeds = list(range(args.proxy_seeds or args.seeds))
    common = {
        "store": store,
        "model": "minilm",
        "mode": "frozen",
        "head_hidden": args.head_hidden,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": 32,
        "score_epoch": 2,
        "embed_cache": str(args.embed_cache),
        "max_length": args.max_length,
        "gradient_scores": not args.no_gradient_scores,
    }
    if args.finetune_rows:
        torch.set_num_threads(os.cpu_count() or 1)  # in-process training (one seed) gets all cores
        common = {**common, "mode": "finetune", "batch_size": 16, "score_batch_size": 32}
    if args.aum_threshold_samples:
        common = {**common, "aum_threshold_samples": True}
    if args.noise_only or args.aum_threshold_samples:
        return noise_only(args, train_file, source, store, common, proxy_seeds)
    times = {}
    t = time.perf_counter()
    train = train_run(TrainConfig(data={"path": str(train_file), **source}, seeds=proxy_seeds, **common))
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    fractions = [float(f) for f in args.fractions.split(",")]
    select = {"store": store, "scores_run": train["run_id"], "fractions": fractions}
    selections = [select_flow(SelectConfig(**select, score=None, seeds=seeds))]
    selections += [select_flow(SelectConfig(**select, score=s, drop="easy")) for s in args.scores.split(",")]
    times["select"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate_run(
        EvaluateConfig(
            store=store,
            train_run=train["run_id"],
            selection_runs=[s["run_id"] for s in selections],
            eval_data={"path": str(eval_file), **source},
            seeds=seeds,
            budget=args.budget,
            plot=str(args.plot),
        )
    )
    times["evaluate"] = time.perf_counter() - t

    print(ev["summary"])
    result = {"train_run": train["run_id"]}
    if not args.no_noise:
        noisy_run, aurocs, n_flipped, times["train_noisy"] = noise_study(
            args, train_file, source, store, common, proxy_seeds
        )
        print_aurocs(aurocs)
        result |= {"noisy_run": noisy_run["run_id"], "auroc": aurocs, "flipped": n_flipped}
    print(json.dumps(result | {"seconds": {k: round(v, 1) for k, v in times.items()}}))


def noise_study(args, train_file: Path, source: dict, store: str, common: dict, seeds: list[int]):
    """Train on a copy with 10% of labels flipped; AUROC of each score ranking the flipped samples first."""
    from gradsift.flows.train import train as train_run
    from gradsift.schemas.train import TrainConfig
    from gradsift.signals.dynamics import auroc
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store

    noisy = args.work / f"{args.data.name}-{train_file.stem}-noisy10.tsv"
    flipped = noisy_copy(train_file, noisy, 0.10, seed=0, label_col=1, header=args.data.name == "sst2")
    t = time.perf_counter()
    run = train_run(TrainConfig(data={"path": str(noisy), **source}, seeds=seeds, **common))
    seconds = time.perf_counter() - t
    table = query(
        Store(store),
        "SELECT m.line, s.* FROM scores s JOIN samples m USING (dataset, sample_id) WHERE s.run_id = $run",
        {"run": run["run_id"]},
    ).to_pandas()
    table = table[table["aum"].notna()]  # threshold samples in every seed have no scores
    is_flipped = table["line"].isin(flipped).to_numpy()
    oriented = {
        "el2n": table["el2n"],
        "grand": table["grand"],
        "forgetting": table["forgetting"] + 1000 * table["never_learned"],
        "aum (low first)": -table["aum"],
        "vog": table["vog"],
        "self_influence": table["self_influence"],
        "final loss": table["loss"],
    }
    aurocs = {
        k: round(auroc(np.asarray(v, dtype=float), is_flipped), 4) for k, v in oriented.items() if v.notna().all()
    }
    if run.get("aum_threshold") is not None:
        flagged = (table["aum"] < run["aum_threshold"]).to_numpy()
        hits = int((flagged & is_flipped).sum())
        aurocs["threshold flags: precision"] = round(hits / max(int(flagged.sum()), 1), 4)
        aurocs["threshold flags: recall"] = round(hits / int(is_flipped.sum()), 4)
    return run, aurocs, int(is_flipped.sum()), seconds


def print_aurocs(aurocs: dict) -> None:
    print("\nplanted 10% label noise: AUROC of each score ranking the flipped samples first")
    for k, v in aurocs.items():
        print(f"  {k:28s} {v:.4f}")


def noise_only(args, train_file: Path, source: dict, store: str, common: dict, seeds: list[int]) -> None:
    """The label-noise study alone (--noise-only, or with threshold samples)."""
    run, aurocs, n_flipped, seconds = noise_study(args, train_file, source, store, common, seeds)
    print_aurocs(aurocs)
    print(json.dumps({"noisy_run": run["run_id"], "auroc": aurocs, "flipped": n_flipped, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
