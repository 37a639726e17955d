"""``select --auto`` inside the select flow: candidates tried on a validation split of a frozen-mode train run's
samples (selection.auto), every trial to ``selection_trials`` and a plot, the choice and its reason to ``selections``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gradsift.models.embeddings import cached_embeddings
from gradsift.schemas.tables import SELECTION_TRIALS
from gradsift.schemas.train import SelectConfig, TrainConfig
from gradsift.selection.auto import AutoResult, auto_select
from gradsift.selection.by_score import select_one
from gradsift.selection.subsets import SelectionResult
from gradsift.storage.store import Store
from gradsift.training.proxy import embed_cache_dir


def _embeddings(store: Store, config: SelectConfig, frame: dict) -> tuple[np.ndarray, TrainConfig]:
    """The cached frozen-mode embeddings of ``frame``'s samples (text and pair), in its order."""
    row = store.read_run(config.scores_run)
    train = TrainConfig.model_validate_json(row["config"]) if row else None
    if train is None or train.mode != "frozen":
        raise ValueError(f"--auto needs a frozen-mode train run; {config.scores_run!r} is not one")
    samples = store.run_table("samples", config.scores_run).to_pylist()
    by_id = {(r["dataset"], r["sample_id"]): r for r in samples}
    rows = [by_id[(d, s)] for d, s in zip(frame["dataset"], frame["sample_id"], strict=True)]
    texts, pairs = [r["text"] for r in rows], [r.get("text_pair") for r in rows]
    return cached_embeddings(embed_cache_dir(train), row["model"], texts, train.max_length, pairs=pairs), train


def auto_selection(store: Store, config: SelectConfig, frame: dict) -> tuple[str, SelectionResult, AutoResult]:
    """(selection name, the selection over every sample, the trials) of ``select --auto``."""
    x, train = _embeddings(store, config, frame)
    classes = sorted(set(frame["label"].tolist()))
    y = np.array([classes.index(v) for v in frame["label"]])
    seeds = config.seeds if len(config.seeds) >= 2 else [0, 1, 2]  # a seed spread needs seeds
    auto = auto_select(x, y, config.fractions, seeds, config.budget, config.validation, train.epochs)
    if auto.chosen is not None:
        c = auto.chosen
        chosen = config.model_copy(update={"score": c.score, "drop": c.drop, "auto": False})
        result, fraction = select_one(chosen, frame, c.fraction, seeds[0]), c.fraction
    else:
        fraction = config.fractions[0] if config.when_none_wins == "random" else 1.0
        result = select_one(config.model_copy(update={"score": None}), frame, fraction, seeds[0])
    result.reason = f"auto: {auto.chosen.name if auto.chosen else config.when_none_wins}: {auto.reason}; " + (
        auto.direction.reason
    )
    return f"auto-keep{fraction:.2f}", result, auto


def trials_table(name: str, auto: AutoResult) -> pa.Table:
    return pa.Table.from_pylist([{"selection": name, **t} for t in auto.trials], schema=SELECTION_TRIALS)


def plot_trials(table: pa.Table, path) -> None:
    """Mean validation accuracy of every candidate, the chosen one highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pylist()
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    means = [np.mean([r["accuracy"] for r in rows if r["candidate"] == n]) for n in names]
    chosen = {r["candidate"] for r in rows if r["chosen"]}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(names, means, color=["tab:green" if n in chosen else "tab:gray" for n in names])
    ax.set_xlim(min(means) - 0.02, max(means) + 0.01)
    ax.set_xlabel("accuracy on the validation split of the training data")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
