"""``select --auto`` inside the select flow: candidates tried on a validation split of a frozen-mode train run's
samples (selection.auto), every trial to ``selection_trials`` and a plot, the choice and its reason to ``selections``;
and ``select``'s default direction (the rule, when no --drop is given)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gradsift.models.embeddings import cached_embeddings
from gradsift.models.loading import minilm_path
from gradsift.schemas.select import AutoSelectConfig
from gradsift.schemas.tables import SELECTION_TRIALS
from gradsift.schemas.train import SelectConfig, TrainConfig
from gradsift.selection.auto import (
    AutoResult,
    applied,
    auto_reason,
    auto_select,
    candidate_selection,
    head_scores,
    proxy_direction,
    train_head,
)
from gradsift.selection.by_score import select_one
from gradsift.selection.direction import Direction, visits_direction
from gradsift.selection.subsets import SelectionResult
from gradsift.storage.catalog import query
from gradsift.storage.store import Store
from gradsift.training.proxy import embed_cache_dir


def _train_config(store: Store, run_id: str) -> TrainConfig:
    row = store.read_run(run_id)
    if row is None or row.get("flow") != "train" or not row.get("config"):
        raise ValueError(
            f"{run_id!r} is not a train run: --auto and the default direction (no --drop) read a train run's dynamics"
        )
    return TrainConfig.model_validate_json(row["config"])


def _embeddings(store: Store, config: SelectConfig, frame: dict) -> tuple[np.ndarray, TrainConfig]:
    """The cached frozen-mode embeddings of ``frame``'s samples (text and pair), in its order."""
    train = _train_config(store, config.scores_run)
    if train.mode != "frozen":
        raise ValueError(f"--auto needs a frozen-mode train run; {config.scores_run!r} is not one")
    samples = store.run_table("samples", config.scores_run).to_pylist()
    by_id = {(r["dataset"], r["sample_id"]): r for r in samples}
    rows = [by_id[(d, s)] for d, s in zip(frame["dataset"], frame["sample_id"], strict=True)]
    texts, pairs = [r["text"] for r in rows], [r.get("text_pair") for r in rows]
    model = store.read_run(config.scores_run)["model"]
    return cached_embeddings(embed_cache_dir(train), model, texts, train.max_length, pairs=pairs), train


def _labels(frame: dict) -> np.ndarray:
    classes = sorted(set(frame["label"].tolist()))
    return np.array([classes.index(v) for v in frame["label"]])


def default_direction(store: Store, config: SelectConfig, frame: dict) -> Direction:
    """The direction rule (selection.direction) on the train run ``config.scores_run``: ``select``'s drop when none
    is given. Frozen mode: the proxy --auto would train (a head on the cached embeddings, held-out accuracy on the
    same validation split); finetune mode: the run's own visit log (``visits_direction``)."""
    train = _train_config(store, config.scores_run)
    if train.mode == "frozen":
        x, _ = _embeddings(store, config, frame)
        return proxy_direction(x, _labels(frame), config.validation, train.epochs)[3]
    sql = "SELECT checkpoint, sample_id, epoch, step, correct FROM dynamics WHERE run_id = $run"
    visits = query(store, sql, {"run": config.scores_run})
    if visits.num_rows == 0:
        raise ValueError(f"train run {config.scores_run!r} has no dynamics rows (give the direction: --drop)")
    return visits_direction(*(visits.column(c).to_numpy(zero_copy_only=False) for c in visits.column_names))


def auto_selection(store: Store, config: SelectConfig, frame: dict) -> tuple[str, SelectionResult, AutoResult]:
    """(selection name, the selection over every sample, the trials) of ``select --auto``: the applied candidate
    selects by the train run's scores."""
    x, train = _embeddings(store, config, frame)
    seeds = config.seeds if len(config.seeds) >= 2 else [0, 1, 2]  # a seed spread needs seeds
    auto = auto_select(x, _labels(frame), config.fractions, seeds, config.budget, config.validation, train.epochs)
    c = applied(auto, config.fractions, config.when_none_wins)
    score = None if c.score in ("all", "random") else c.score
    result = select_one(config.model_copy(update={"score": score, "drop": c.drop or None}), frame, c.fraction, seeds[0])
    result.reason = auto_reason(auto, config.when_none_wins)
    return f"auto-keep{c.fraction:.2f}", result, auto


def samples_auto_selection(
    section: AutoSelectConfig, rows: list[dict], cache: str
) -> tuple[str, SelectionResult, AutoResult]:
    """``select --auto`` on ingested sample ``rows`` (text, text_pair, label, sample_id) without a train run: embedded
    by the frozen encoder (cached in ``cache``), the candidates tried; the applied one selects by a head proxy's
    scores on all rows."""
    encoder = str(minilm_path()) if section.encoder == "minilm" else section.encoder
    texts, pairs = [r["text"] for r in rows], [r.get("text_pair") for r in rows]
    x = cached_embeddings(cache, encoder, texts, section.max_length, pairs=pairs)
    y = _labels({"label": np.array([r["label"] for r in rows], dtype=object)})
    seeds = section.seeds if len(section.seeds) >= 2 else [0, 1, 2]
    auto = auto_select(x, y, section.fractions, seeds, section.budget, section.validation, section.epochs)
    c = applied(auto, section.fractions, section.when_none_wins)
    scores = head_scores(train_head(x, y, int(y.max()) + 1, section.epochs, seeds[0])) if c.drop else {}
    result = candidate_selection(c, np.array([r["sample_id"] for r in rows]), scores, y, seeds[0])
    result.reason = auto_reason(auto, section.when_none_wins)
    return f"auto-keep{c.fraction:.2f}", result, auto


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
