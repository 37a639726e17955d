"""Planted label noise on AG News, frozen MiniLM: AUM's AUROC against a clean-label oracle and cleanlab, by size.

For each training size and each seeded subset of that size, 10% of the labels are flipped to another class
(seeded: ``plant_noise``, as in bench/auto_select.py) and the flipped rows are ranked by:
- AUM (Pleiss et al. 2020, "Identifying Mislabeled Data using the Area Under the Margin Ranking": the margin
  averaged over the training epochs; ``head_scores``) of a head on the noisy labels, averaged over head seeds:
  the linear head of ``select --auto`` (AdamW 3e-3, 6 epochs) and a 256-unit hidden layer (AdamW 1e-3, 8 epochs,
  the issue 4 proxy);
- the oracle: the margin of a linear head trained on the clean labels of the test split (it never sees the noisy
  rows), so its AUROC is what the frozen features allow on that subset, with no noise in the training labels;
- cleanlab's self-confidence on out-of-fold probabilities (Northcutt et al. 2021; 5-fold logistic regression,
  ``cleanlab.rank.get_label_quality_scores``), where cleanlab is importable (it is not a gradsift dependency).

    PYTHONPATH=. python bench/label_noise.py --data ../shared/data/agnews --embed-cache .cache/emb \\
        --sizes 1500,4000,7000,all --subsets 0,1,2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from gradsift.env import configure_environment

configure_environment()

from bench.auto_select import embed, plant_noise, sample, tsv_rows  # noqa: E402
from gradsift.selection.auto import head_scores, train_head  # noqa: E402
from gradsift.signals.dynamics import auroc, margin  # noqa: E402

HEADS = {"linear": {"lr": 3e-3, "epochs": 6, "hidden": 0}, "mlp256": {"lr": 1e-3, "epochs": 8, "hidden": 256}}


def cleanlab_auroc(x: np.ndarray, noisy: np.ndarray, flipped: np.ndarray) -> float | None:
    """AUROC of cleanlab's self-confidence (out-of-fold, 5-fold logistic regression); None without cleanlab."""
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        return None
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    probs = cross_val_predict(LogisticRegression(max_iter=2000), x, noisy, cv=5, method="predict_proba")
    return auroc(-get_label_quality_scores(noisy, probs, method="self_confidence"), flipped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/agnews"))
    ap.add_argument("--embed-cache", type=Path, required=True, help="Embedding cache folder (git-ignored).")
    ap.add_argument("--sizes", default="4000,all", help="Training rows per subset (comma-separated; all: every row).")
    ap.add_argument("--subsets", default="0,1,2", help="Subset seeds (the rows drawn for each size).")
    ap.add_argument("--head-seeds", type=int, default=3, help="Head seeds whose AUMs are averaged.")
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    train, test = tsv_rows(args.data / "train.tsv", False), tsv_rows(args.data / "test.tsv", False)
    classes = sorted({r["label"] for r in train})
    xt, yt = embed(test, args.embed_cache, args.max_length), np.array([classes.index(r["label"]) for r in test])
    seeds = range(args.head_seeds)
    oracles = [train_head(xt, yt, len(classes), HEADS["linear"]["epochs"], s).model for s in seeds]
    print("rows  subset  flipped  oracle  AUM linear  AUM mlp256  cleanlab  seconds")
    table: dict[str, list[dict]] = {}
    for size in args.sizes.split(","):
        for subset in map(int, args.subsets.split(",")):
            if size == "all" and subset != int(args.subsets.split(",")[0]):
                continue  # every row: one subset
            started = time.perf_counter()
            rows = sample(train, len(train) if size == "all" else int(size), subset)
            y = np.array([classes.index(r["label"]) for r in rows])
            x = embed(rows, args.embed_cache, args.max_length)
            noisy, flipped = plant_noise(y, len(classes))
            with torch.no_grad():
                xs, ns = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(noisy)
                oracle = np.mean([margin(h(xs), ns).numpy() for h in oracles], 0)
            r = {"oracle": auroc(-oracle, flipped), "cleanlab": cleanlab_auroc(x, noisy, flipped)}
            for name, h in HEADS.items():
                aum = np.mean([head_scores(train_head(x, noisy, len(classes), seed=s, **h))["aum"] for s in seeds], 0)
                r[name] = auroc(-aum, flipped)
            table.setdefault(size, []).append(r)
            cl = "-" if r["cleanlab"] is None else f"{r['cleanlab']:.4f}"
            print(f"{len(y):>5}  {subset:>6}  {flipped.sum():>7}  {r['oracle']:.4f}  {r['linear']:>10.4f}  "
                  f"{r['mlp256']:>10.4f}  {cl:>8}  {time.perf_counter() - started:>7.1f}", flush=True)  # fmt: skip
    for size, rs in table.items():
        means = {k: np.mean([r[k] for r in rs]) for k in ("oracle", "linear", "mlp256")}
        print(f"{size}: mean over {len(rs)} subsets: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))


if __name__ == "__main__":
    main()
