"""Evaluate's figures: held-out accuracy (or loss) against the fraction kept, one line per score and direction,
and the same numbers as a markdown table (mean and spread over seeds)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradsift.storage.atomic import write_atomic


def plot_curves(table: pa.Table, path: Path, title: str, metric: str = "accuracy") -> Path:
    """``metric`` (accuracy, or loss for causal LMs) vs fraction kept: mean over seeds with a min-max band,
    one line per score/drop (a colour per score, dashed where hard samples were dropped; random in gray)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pylist()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = [r[metric] for r in rows if r["score"] == "all"]
    if full:
        ax.axhline(np.mean(full), color="black", ls=":", lw=1, label=f"all data ({np.mean(full):.4f})")
    lines = sorted({(r["score"], r["drop"]) for r in rows if r["score"] != "all"})
    scores = sorted({score for score, _ in lines if score != "random"})
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # tab10's gray is random's
    colour = {score: palette[i % len(palette)] for i, score in enumerate(scores)} | {"random": "gray"}
    for score, drop in lines:
        by_fraction: dict[float, list[float]] = defaultdict(list)
        for r in rows:
            if (r["score"], r["drop"]) == (score, drop):
                by_fraction[round(r["fraction_kept"], 3)].append(r[metric])
        xs = sorted(by_fraction)
        mean = [np.mean(by_fraction[x]) for x in xs]
        label = score if score == "random" else f"{score} (drop {drop})"
        style = "--" if drop == "hard" else "-"
        ax.plot(xs, mean, marker="o", ls=style, label=label, color=colour[score])
        lo, hi = [min(by_fraction[x]) for x in xs], [max(by_fraction[x]) for x in xs]
        ax.fill_between(xs, lo, hi, alpha=0.15, color=colour[score])
    ax.set_xlabel("fraction of training data kept")
    ax.set_ylabel(f"held-out {metric}")
    ax.invert_xaxis()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def summary_markdown(table: pa.Table, metric: str = "accuracy") -> str:
    """Mean and spread of the held-out ``metric`` per selection line and fraction, as a markdown table."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in table.to_pylist():
        acc[(r["score"], r["drop"], round(r["fraction_kept"], 2))].append(r[metric])
    lines = [f"| score | drop | kept | {metric} (mean) | min | max | seeds |", "|---|---|---|---|---|---|---|"]
    for (score, drop, frac), values in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        lines.append(
            f"| {score} | {drop} | {frac:.2f} | {np.mean(values):.4f} | {min(values):.4f} | {max(values):.4f} | "
            f"{len(values)} |"
        )
    return "\n".join(lines)
