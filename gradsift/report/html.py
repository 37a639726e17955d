"""Run reports: PNG plots and one HTML page per run (matplotlib, no prefect or ray).

``write_report`` takes plain tables (pyarrow) of what a run produced and writes
``<out>/index.html`` plus one PNG per plot; it returns a markdown summary for the Prefect artifact.
Sections appear only for the tables given. Flows write into the run's staging folder
(``RunStaging.artifact_dir("reports")``) and name the folder the commit moves it to (``final``).
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_score_histograms(influence: pa.Table, path: Path) -> str:
    """One histogram per (target, method) of the training samples' influence scores, by dataset."""
    rows = influence.to_pydict()
    by_key: dict[tuple[str, str], dict[str, list[float]]] = {}
    for t, m, ds, s in zip(rows["target"], rows["method"], rows["dataset"], rows["score"], strict=True):
        by_key.setdefault((t, m), {}).setdefault(ds, []).append(s)
    keys = sorted(by_key)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, (t, m) in zip(axes[0], keys, strict=True):
        for ds, vals in sorted(by_key[(t, m)].items()):
            ax.hist(vals, bins=40, alpha=0.55, label=ds)
        ax.set_title(f"{m} influence on {t}")
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_mixture(mixtures: pa.Table, path: Path) -> str:
    """Prior vs learned mixture weight per domain."""
    d = mixtures.to_pydict()
    x = np.arange(len(d["domain"]))
    fig, ax = plt.subplots(figsize=(1.4 * len(x) + 2.5, 3.2))
    ax.bar(x - 0.2, d["prior"], 0.4, label="prior")
    ax.bar(x + 0.2, d["weight"], 0.4, label="weight")
    ax.set_xticks(x, d["domain"])
    ax.set_ylabel("mixture weight")
    ax.legend()
    return _save(fig, path)


def plot_layer_curves(curves: pa.Table, path: Path) -> str:
    """Mean nuclear norm per layer, one panel per module, one line per variant."""
    d = curves.to_pydict()
    modules = sorted(set(d["module"]))
    fig, axes = plt.subplots(1, len(modules), figsize=(3.2 * len(modules), 3.0), squeeze=False)
    for ax, module in zip(axes[0], modules, strict=True):
        for variant in sorted(set(d["variant"])):
            pts = sorted(
                (layer, v)
                for layer, m, var, v in zip(d["layer"], d["module"], d["variant"], d["nuclear_norm"], strict=True)
                if m == module and var == variant
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.set_title(module)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("mean nuclear norm")
    axes[0][0].legend()
    return _save(fig, path)


def plot_pairs(pairs: pa.Table, path: Path) -> str:
    """Histograms of the pairs' gradient cosine and condition ratio."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.0))
    for ax, col in zip(axes, ("cosine", "condition_ratio"), strict=True):
        ax.hist(pairs.column(col).to_numpy(), bins=50)
        ax.set_title(col)
    return _save(fig, path)


def _html_table(table: pa.Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.column_names)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row.values()) + "</tr>"
        for row in table.to_pylist()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_table(table: pa.Table) -> str:
    lines = ["| " + " | ".join(table.column_names) + " |", "|" + "---|" * table.num_columns]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "/") for v in r.values()) + " |" for r in table.to_pylist()]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)[:160].replace("\n", " ")


PLOTS = {
    "influence": ("Influence score histograms", plot_score_histograms),
    "mixtures": ("Mixture weights", plot_mixture),
    "layer_curves": ("Layer curves (fast vs slow)", plot_layer_curves),
    "pair_scores": ("Preference-pair entanglement", plot_pairs),
}


def write_report(
    out: Path,
    run_id: str,
    tables: dict[str, pa.Table],
    summaries: dict[str, pa.Table],
    final: Path | None = None,
) -> tuple[Path, str]:
    """Write ``out/index.html`` and its PNGs from ``tables`` (keys of PLOTS) and small ``summaries``
    (titled tables shown as they are, e.g. top influential samples); returns (page, markdown).

    ``final``: the folder ``out`` is moved to once written (a staged run's report, committed with the run);
    the page returned and the paths in the markdown are there. Default: ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    shown = final or out
    parts = [f"<h1>gradsift run {html.escape(run_id)}</h1>"]
    md = [f"# gradsift run `{run_id}`", "", f"Report: `{shown / 'index.html'}`", ""]
    for key, (title, plot) in PLOTS.items():
        table = tables.get(key)
        if table is None or table.num_rows == 0:
            continue
        name = plot(table, out / f"{key}.png")
        parts.append(f"<h2>{title}</h2><img src='{name}'>")
        md.append(f"- {title}: `{shown / name}`")
    for title, table in summaries.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_html_table(table)}")
        md += ["", f"## {title}", "", _md_table(table)]
    style = "<style>body{font-family:sans-serif;max-width:1200px}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
    (out / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>{''.join(parts)}</body></html>"
    )
    return shown / "index.html", "\n".join(md) + "\n"
