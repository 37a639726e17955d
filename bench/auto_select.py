"""``select --auto`` and the direction rule on AG News, SST-2 and SNLI (sentence pairs), frozen MiniLM, CPU.

Per set: a seeded subset of the training rows and of the test rows, embedded once (cached under --embed-cache,
outside the repository; SNLI premise and hypothesis jointly, as a sentence pair). ``auto_select`` runs on the
training rows only (its own validation split); then, on the test rows: all data, every score in both directions
and random at ``--fraction`` kept (3 seeds each, scores from a head proxy on all training rows), what --auto picked
and the side the direction rule picked. On AG News also the label-noise AUROC of AUM (10% labels flipped, seeded).

    .venv/bin/python bench/auto_select.py --data ../shared/data --embed-cache /tmp/gs-auto/emb --plot docs/auto_select.png

SNLI's three-file layout (esnli_s1.<split>, esnli_s2.<split>, esnli_labels.<split>; line i of each is one pair) is
read by ``snli_rows``; for ``gradsift ingest`` write them as JSONL to a temporary folder first
(``write_snli_jsonl``) and map ``--text-field premise --text-pair-field hypothesis``.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np

from gradsift.env import configure_environment

configure_environment()

from gradsift.models.embeddings import cached_embeddings  # noqa: E402
from gradsift.models.loading import minilm_path  # noqa: E402
from gradsift.selection.auto import AUTO_SCORES, Candidate, accuracy, auto_select, head_scores, subset_mask, train_head  # noqa: E402
from gradsift.signals.dynamics import auroc  # noqa: E402


def snli_rows(folder: Path, split: str) -> list[dict]:
    """SNLI's three files of one split as {premise, hypothesis, label} rows (line i of each file is one pair)."""
    read = [(folder / f"esnli_{part}.{split}").read_text().splitlines() for part in ("s1", "s2", "labels")]
    return [{"premise": p.strip(), "hypothesis": h.strip(), "label": y.strip()} for p, h, y in zip(*read, strict=True)]


def write_snli_jsonl(folder: Path, split: str, out: Path) -> Path:
    """The split as JSONL in ``out`` (a temporary folder) for ``gradsift ingest``."""
    path = out / f"snli_{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in snli_rows(folder, split)))
    return path


def tsv_rows(path: Path, header: bool) -> list[dict]:
    rows = list(csv.reader(path.open(newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))[header:]
    return [{"premise": r[0], "hypothesis": None, "label": r[1]} for r in rows if len(r) == 2]


def load_set(name: str, data: Path) -> tuple[list[dict], list[dict]]:
    if name == "snli":
        return snli_rows(data / "snli", "dev"), snli_rows(data / "snli", "test")
    header = name == "sst2"
    return tsv_rows(data / name / "train.tsv", header), tsv_rows(data / name / "test.tsv", header)


def sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False))
    return [rows[i] for i in keep]


def embed(rows: list[dict], cache: Path, max_length: int) -> np.ndarray:
    pairs = [r["hypothesis"] for r in rows]
    return cached_embeddings(cache, str(minilm_path()), [r["premise"] for r in rows], max_length, pairs=pairs)


def test_accuracy(c: Candidate, x, y, xt, yt, scores, seeds, epochs) -> list[float]:
    accs = []
    for seed in seeds:
        kept = subset_mask(c, np.arange(len(y)), scores, y, seed)
        accs.append(accuracy(train_head(x[kept], y[kept], int(y.max()) + 1, epochs, seed).model, xt, yt))
    return accs


def study(name: str, args) -> dict:
    train, test = load_set(name, args.data)
    train, test = sample(train, args.train_rows, 0), sample(test, args.test_rows, 1)
    classes = sorted({r["label"] for r in train})
    y = np.array([classes.index(r["label"]) for r in train])
    yt = np.array([classes.index(r["label"]) for r in test])
    x, xt = embed(train, args.embed_cache, args.max_length), embed(test, args.embed_cache, args.max_length)
    seeds, f = (0, 1, 2), args.fraction
    auto = auto_select(x, y, fractions=(f,), seeds=seeds, budget=args.budget, epochs=args.epochs)
    scores = head_scores(train_head(x, y, len(classes), args.epochs, seed=0))
    cands = [Candidate("all", "", 1.0), Candidate("random", "", f)]
    cands += [Candidate(s, d, f) for s in AUTO_SCORES for d in ("easy", "hard")]
    test_acc = {c.name: test_accuracy(c, x, y, xt, yt, scores, seeds, args.epochs) for c in cands}
    picked = auto.chosen.name if auto.chosen else "all"
    side = {d: float(np.mean([np.mean(test_acc[f"{s}-drop-{d}-keep{f:.2f}"]) for s in AUTO_SCORES]))
            for d in ("easy", "hard")}  # fmt: skip
    out = {"set": name, "n_train": len(y), "n_test": len(yt), "test": test_acc, "auto": picked,
           "auto_reason": auto.reason, "rule": auto.direction.drop, "rule_reason": auto.direction.reason,
           "side_mean": side, "trials": auto.trials}  # fmt: skip
    if name == "agnews":
        flipped = np.random.default_rng(5).random(len(y)) < 0.1
        noisy = np.where(flipped, (y + np.random.default_rng(6).integers(1, len(classes), len(y))) % len(classes), y)
        aums = np.mean([head_scores(train_head(x, noisy, len(classes), args.epochs, s))["aum"] for s in seeds], 0)
        out["noise_auroc_aum"] = auroc(-aums, flipped)
    return out


def table(results: list[dict], fraction: float) -> str:
    f = fraction
    names = ["all", f"random-keep{f:.2f}"] + [
        f"{s}-drop-{d}-keep{f:.2f}" for s in AUTO_SCORES for d in ("easy", "hard")
    ]
    lines = ["| candidate | " + " | ".join(r["set"] for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for n in names:
        cells = [f"{100 * np.mean(r['test'][n]):.2f} [{100 * min(r['test'][n]):.2f}-{100 * max(r['test'][n]):.2f}]"
                 for r in results]  # fmt: skip
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| --auto picked | " + " | ".join(f"{r['auto']} ({100 * np.mean(r['test'][r['auto']]):.2f})"
                                                   for r in results) + " |")  # fmt: skip
    lines.append("| rule: drop | " + " | ".join(f"{r['rule']} (easy {100 * r['side_mean']['easy']:.2f} / hard "
                                                  f"{100 * r['side_mean']['hard']:.2f})" for r in results) + " |")  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], fraction: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for ax, r in zip(np.atleast_1d(axes), results, strict=True):
        names = list(r["test"])
        means = [100 * np.mean(r["test"][n]) for n in names]
        colors = ["tab:green" if n == r["auto"] else "tab:gray" if n in ("all", f"random-keep{fraction:.2f}")
                  else "tab:blue" for n in names]  # fmt: skip
        ax.barh(names, means, color=colors)
        ax.set_xlim(min(means) - 2, max(means) + 1)
        ax.set_title(f"{r['set']} ({r['n_train']} train rows), keep {fraction:.0%}; green: --auto")
        ax.set_xlabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--embed-cache", type=Path, default=Path(tempfile.gettempdir()) / "gs-auto-emb")
    parser.add_argument("--sets", default="agnews,sst2,snli")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--test-rows", type=int, default=1500)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--fraction", type=float, default=0.55, help="Fraction kept (0.55: 45% pruned).")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budget", type=int, default=30, help="Retrainings --auto may spend.")
    parser.add_argument("--plot", type=Path, default=Path("docs/auto_select.png"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, nargs="*", help="Print and plot earlier --json results instead.")
    args = parser.parse_args()
    if args.from_json:
        results = [r for path in args.from_json for r in json.loads(path.read_text())]
    else:
        results = [study(name, args) for name in args.sets.split(",")]
    print(table(results, args.fraction))
    for r in results:
        print(f"{r['set']}: auto {r['auto']} ({r['auto_reason']}); rule {r['rule_reason']}")
        if "noise_auroc_aum" in r:
            print(f"{r['set']}: label-noise AUROC of AUM (10% flipped) {r['noise_auroc_aum']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    plot(results, args.fraction, args.plot)


if __name__ == "__main__":
    main()
