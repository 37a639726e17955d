"""The evaluation run: retrain on each selection from the same start, measure held-out accuracy/loss.

Writes the ``evaluations`` table, a plot of accuracy versus fraction kept (one line per score and
drop side, one for random, shaded over seeds; staged with the run and committed to
``<store>/reports/<run_id>/`` unless ``plot`` names a path) and a Prefect markdown artifact with the table.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from gradsift.executors.ray import run_jobs
from gradsift.flows.runner import flow_or_direct, lazy_flows, markdown_artifact, stage
from gradsift.flows.runs import run_recorded
from gradsift.flows.stages import ingest_config, ingest_stage
from gradsift.report.curves import plot_curves, summary_markdown
from gradsift.schemas.tables import EVALUATIONS
from gradsift.schemas.train import EvaluateConfig, SelectConfig, TrainConfig
from gradsift.storage.catalog import query
from gradsift.storage.store import Store
from gradsift.training.jobs import evaluate_selections


def _selections(store: Store, runs: list[str]) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Kept ids per selection, and per selection its score, drop side and fraction kept."""
    runs = {"runs": list(runs)}
    rows = query(
        store, "SELECT run_id, selection, sample_id, kept FROM selections WHERE list_contains($runs, run_id)", runs
    )
    configs = {
        r["run_id"]: SelectConfig.model_validate_json(r["config"])
        for r in query(store, "SELECT run_id, config FROM runs WHERE list_contains($runs, run_id)", runs).to_pylist()
    }
    kept: dict[str, list[str]] = defaultdict(list)
    total: dict[str, int] = defaultdict(int)
    info: dict[str, dict] = {}
    for r in rows.to_pylist():
        total[r["selection"]] += 1
        if r["kept"]:
            kept[r["selection"]].append(r["sample_id"])
        cfg = configs[r["run_id"]]
        info[r["selection"]] = {"score": cfg.score or "random", "drop": cfg.drop if cfg.score else ""}
    for name in info:
        info[name]["fraction_kept"] = len(kept[name]) / total[name]
    return dict(kept), info


@stage("retrain")
def retrain_stage(config: EvaluateConfig, train: TrainConfig, base: str, parts: tuple, label_index, jobs) -> list:
    """Every (selection, seed) retraining, in as many groups as the config has actors (a group an item of the
    Ray pool, loading the data once)."""
    groups = [jobs[i :: config.ray.num_actors] for i in range(min(config.ray.num_actors, len(jobs)))]
    calls = [(train, base, parts[0], parts[1], label_index, group, config.budget) for group in groups]
    return [row for rows in run_jobs(evaluate_selections, calls, config.ray) for row in rows]


def evaluate_run(config: EvaluateConfig) -> dict:
    """Retrain the train run's model on every selection of ``config.selection_runs`` and evaluate."""
    store = Store(config.store)
    train_row = store.read_run(config.train_run)
    if train_row is None or train_row["status"] != "completed":
        raise ValueError(f"no completed train run {config.train_run!r} in {store.root}")
    train = TrainConfig.model_validate_json(train_row["config"])
    base = train_row["model"]
    train_samples = store.run_table("samples", config.train_run)
    classification = train.task == "classification"
    labels = sorted(set(train_samples["label"].to_pylist()))
    label_index = {label: i for i, label in enumerate(labels)} if classification else None
    kept, info = _selections(store, config.selection_runs)

    def body(recorder) -> dict:
        held_out = ingest_config(
            config.store, base, config.eval_data, classification, labels if classification else None
        )
        ingest_stage(held_out, recorder.staging)
        eval_parts = [str(p) for p in recorder.staging.parts("samples")]
        # the train run's samples, out of the lake for the retraining workers (scratch: not committed again)
        train_parts = [str(recorder.staging.scratch.write_part("train_samples", "all", train_samples))]
        jobs = [(name, ids, seed) for name, ids in sorted(kept.items()) for seed in config.seeds]
        if config.include_full:
            jobs = [("all", None, seed) for seed in config.seeds] + jobs
        rows = retrain_stage(config, train, base, (train_parts, eval_parts), label_index, jobs)
        meta = {**info, "all": {"score": "all", "drop": "", "fraction_kept": 1.0}}
        table = pa.Table.from_pylist([{**r, **meta[r["selection"]]} for r in rows], schema=EVALUATIONS)
        recorder.staging.write_part("evaluations", "evaluate", table)
        metric = "accuracy" if classification else "loss"  # a causal LM is judged by its held-out loss
        title = f"{Path(config.eval_data.path).parent.name}: retrained on selections, equal {config.budget}"
        if config.plot:  # the user's own path: written there at once
            plot = plot_curves(table, Path(config.plot), title, metric)
        else:  # a report of the run: staged, and there once the run commits
            plot_curves(table, recorder.staging.artifact_path("reports", f"{metric}.png"), title, metric)
            plot = recorder.staging.final_artifact_path("reports", f"{metric}.png")
        markdown = summary_markdown(table, metric)
        markdown_artifact(
            f"# gradsift evaluate `{recorder.run_id}`\n\ntrain run `{config.train_run}`, held-out "
            f"`{config.eval_data.path}`, budget: equal {config.budget}\n\n{markdown}\n\nplot: `{plot}`\n",
            "evaluate-report",
        )
        return {"evaluations": table.num_rows, "plot": str(plot), "summary": markdown}

    return run_recorded("evaluate", config, [config.eval_data], base, body)


def evaluate(config: EvaluateConfig, prefect: bool = False) -> dict:
    """``evaluate_run`` directly, or as the flow ``gradsift-evaluate``."""
    return flow_or_direct(__name__, "evaluate_flow", evaluate_run, config, prefect)


__getattr__ = lazy_flows(globals(), {"evaluate_flow": ("gradsift-evaluate", evaluate_run)})
