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


def plant_noise(y: np.ndarray, num_labels: int, seed: int = 5, rate: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): each label flipped with probability ``rate`` to another class, seeded."""
    flipped = np.random.default_rng(seed).random(len(y)) < rate
    other = (y + np.random.default_rng(seed + 1).integers(1, num_labels, len(y))) % num_labels
    return np.where(flipped, other, y), flipped


def names_at(f: float) -> list[str]:
    """The test table's candidates at fraction kept ``f``: random, then every score in both directions."""
    return [f"random-keep{f:.2f}"] + [f"{s}-drop-{d}-keep{f:.2f}" for s in AUTO_SCORES for d in ("easy", "hard")]


def study(name: str, args) -> dict:
    train, test = load_set(name, args.data)
    train, test = sample(train, args.train_rows, 0), sample(test, args.test_rows, 1)
    classes = sorted({r["label"] for r in train})
    y = np.array([classes.index(r["label"]) for r in train])
    yt = np.array([classes.index(r["label"]) for r in test])
    x, xt = embed(train, args.embed_cache, args.max_length), embed(test, args.embed_cache, args.max_length)
    seeds, f, fractions = (0, 1, 2), args.fraction, sorted({args.fraction, *args.fractions}, reverse=True)
    auto = auto_select(x, y, fractions=(f,), seeds=seeds, budget=args.budget, epochs=args.epochs)
    wide = auto_select(x, y, fractions=fractions, seeds=seeds, budget=3 * 7 * len(fractions) + 3, epochs=args.epochs)
    scores = head_scores(train_head(x, y, len(classes), args.epochs, seed=0))
    cands = [Candidate("all", "", 1.0)] + [Candidate(s, d, g) for g in fractions for s, d in
                                           [("random", "")] + [(s, d) for s in AUTO_SCORES for d in ("easy", "hard")]]  # fmt: skip
    test_acc = {c.name: test_accuracy(c, x, y, xt, yt, scores, seeds, args.epochs) for c in cands}
    side = {f"{g:.2f}": {d: float(np.mean([np.mean(test_acc[f"{s}-drop-{d}-keep{g:.2f}"]) for s in AUTO_SCORES]))
                         for d in ("easy", "hard")} for g in fractions}  # fmt: skip
    out = {"set": name, "n_train": len(y), "n_test": len(yt), "fractions": fractions, "test": test_acc,
           "auto": auto.chosen.name if auto.chosen else "all", "auto_reason": auto.reason,
           "auto_any": wide.chosen.name if wide.chosen else "all", "auto_any_reason": wide.reason,
           "rule": auto.direction.drop, "rule_reason": auto.direction.reason, "side_mean": side,
           "trials": auto.trials, "trials_any": wide.trials}  # fmt: skip
    if name == "agnews":
        noisy, flipped = plant_noise(y, len(classes))
        aums = np.mean([head_scores(train_head(x, noisy, len(classes), args.epochs, s))["aum"] for s in seeds], 0)
        out["noise_auroc_aum"] = auroc(-aums, flipped)
    return out


def cell(accs: list[float]) -> str:
    return f"{100 * np.mean(accs):.2f} [{100 * min(accs):.2f}-{100 * max(accs):.2f}]"


def table(results: list[dict], fraction: float) -> str:
    """Per set at ``fraction`` kept: every candidate's test accuracy, what --auto picked and the rule's side."""
    f = fraction
    lines = ["| candidate | " + " | ".join(r["set"] for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for n in ["all", *names_at(f)]:
        lines.append(f"| {n} | " + " | ".join(cell(r["test"][n]) for r in results) + " |")
    for key, label in (("auto", f"--auto picked (keep {f:.2f})"), ("auto_any", "--auto picked (any fraction)")):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]} ({100 * np.mean(r['test'][r[key]]):.2f})"
                                                   for r in results) + " |")  # fmt: skip
    s = f"{f:.2f}"
    lines.append("| rule: drop | " + " | ".join(f"{r['rule']} (easy {100 * r['side_mean'][s]['easy']:.2f} / hard "
                                                  f"{100 * r['side_mean'][s]['hard']:.2f})" for r in results) + " |")  # fmt: skip
    return "\n".join(lines)


def curves(r: dict) -> str:
    """One set's test accuracy at every fraction kept (rows) by candidate (columns)."""
    heads = ["random"] + [f"{s}-{d}" for s in AUTO_SCORES for d in ("easy", "hard")]
    lines = ["| kept | " + " | ".join(heads) + " | rule: easy / hard |", "|---" * (len(heads) + 2) + "|"]
    lines.append(f"| 1.00 (all) | {cell(r['test']['all'])} |" + " |" * (len(heads)))
    for g in r["fractions"]:
        side = r["side_mean"][f"{g:.2f}"]
        row = " | ".join(cell(r["test"][n]) for n in names_at(g))
        lines.append(f"| {g:.2f} | {row} | {100 * side['easy']:.2f} / {100 * side['hard']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Test accuracy against the fraction kept, per set: all data, random (its seed range shaded), every score in
    both directions (solid: drop easy, dashed: drop hard); the --auto pick at its fraction as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        fr = r["fractions"]
        rnd = [r["test"][f"random-keep{g:.2f}"] for g in fr]
        ax.axhline(100 * np.mean(r["test"]["all"]), color="black", lw=1, label="all data")
        ax.plot(fr, [100 * np.mean(a) for a in rnd], color="tab:gray", lw=2, label="random")
        ax.fill_between(fr, [100 * min(a) for a in rnd], [100 * max(a) for a in rnd], color="tab:gray", alpha=0.3)
        for s, color in zip(AUTO_SCORES, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            for d, style in (("easy", "-"), ("hard", "--")):
                accs = [100 * np.mean(r["test"][f"{s}-drop-{d}-keep{g:.2f}"]) for g in fr]
                ax.plot(fr, accs, style, color=color, marker=".", label=f"{s} drop {d}")
        for key, mark in (("auto", "*"), ("auto_any", "P")):
            pick = r[key]
            kept = 1.0 if pick == "all" else float(pick.rsplit("keep", 1)[1])
            ax.plot([kept], [100 * np.mean(r["test"][pick])], mark, color="red", ms=12, label=f"{key}: {pick}")
        ax.invert_xaxis()
        ax.set_title(f"{r['set']}: {r['n_train']} train / {r['n_test']} test, rule: drop {r['rule']}")
        ax.set_xlabel("fraction of the training data kept")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=6)
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
    parser.add_argument(
        "--fractions",
        type=lambda v: [float(f) for f in v.split(",")],
        default=[],
        help="More fractions kept for the curves (comma-separated); --auto also picks among them.",
    )
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
        print(f"\n{r['set']}:\n" + curves(r))
        print(
            f"{r['set']}: auto {r['auto']} ({r['auto_reason']}); any fraction {r['auto_any']} "
            f"({r['auto_any_reason']}); rule {r['rule_reason']}"
        )
        if "noise_auroc_aum" in r:
            print(f"{r['set']}: label-noise AUROC of AUM (10% flipped) {r['noise_auroc_aum']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    plot(results, args.plot)


if __name__ == "__main__":
    main()
