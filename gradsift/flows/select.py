"""The selection flow: selections from a train run's scores -> ``selections`` table + manifests.

``select_flow`` (the Prefect flow of ``select_run``) is built on first use, so that a command running
``select_run`` directly does not import prefect; ``select`` runs one or the other as ``flows.runner`` decides. Manifests (the kept samples' original records, in
preference order) are staged with the run and committed with it to ``<store>/manifests/<run_id>/<selection>.parquet`` and ``.jsonl``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from gradsift.flows.runner import flow_or_direct, lazy_flows
from gradsift.flows.runs import run_recorded
from gradsift.schemas.tables import SCORES
from gradsift.schemas.train import SelectConfig
from gradsift.selection.by_score import select_one, selection_name
from gradsift.selection.subsets import selection_table
from gradsift.storage.atomic import write_jsonl_atomic, write_parquet_atomic
from gradsift.storage.catalog import query
from gradsift.storage.store import RunStaging, Store


def write_manifest(staging: RunStaging, name: str, kept: pa.Table) -> None:
    """Parquet and JSONL manifests of the kept samples (with their original records), staged with the run."""
    write_parquet_atomic(kept, staging.artifact_path("manifests", f"{name}.parquet"))
    rows = ({**row, "record": json.loads(row["record"])} for row in kept.to_pylist())
    write_jsonl_atomic(rows, staging.artifact_path("manifests", f"{name}.jsonl"))


def scores_query(column: str) -> str:
    """The SELECT of one train run's ``column`` scores with the samples' labels, domains and records;
    the run id is bound as ``$run``. ``column`` must be a column of ``scores`` (it is an identifier)."""
    if column not in SCORES.names:
        raise ValueError(f"no score column {column!r} (scores has {', '.join(SCORES.names)})")
    return (
        f'SELECT s.dataset, s.sample_id, s."{column}", s.never_learned, m.label, m.domain, m.record '
        "FROM scores s JOIN samples m USING (dataset, sample_id) "
        "WHERE s.run_id = $run ORDER BY s.dataset, s.sample_id"
    )


def select_run(config: SelectConfig) -> dict:
    """Write one selection per (fraction, seed) from the scores of ``config.scores_run`` (seconds of work: the CLI
    runs it through ``select``; ``select_flow`` is the same as a Prefect flow)."""
    store = Store(config.store)
    column = config.score or "loss"
    data = query(store, scores_query(column), {"run": config.scores_run})
    if data.num_rows == 0:
        raise ValueError(f"no scores of run {config.scores_run!r} in {store.root}: run `gradsift train` first")
    if config.score and data.column(config.score).null_count == data.num_rows:
        why = (
            "grad_norm comes from a score run (gradsift score); a train run has grand"
            if config.score == "grad_norm"
            else "trained with gradient_scores=false: select by el2n, forgetting or aum, or train again with "
            "gradient scores"
        )
        raise ValueError(f"run {config.scores_run!r} has no {config.score} scores ({why})")
    frame = {name: data.column(name).to_numpy(zero_copy_only=False) for name in data.column_names}
    frame["never_learned"] = frame["never_learned"].astype(bool)
    rule_note = ""
    if config.score and config.drop is None and not config.auto:  # the run records the resolved direction
        from gradsift.flows.auto_select import default_direction  # torch: only the selections that need it

        rule = default_direction(store, config, frame)
        config = config.model_copy(update={"drop": rule.drop})
        rule_note = f"; direction rule (no --drop): {rule.reason}"

    def body(recorder) -> dict:
        names = []
        if config.auto:
            from gradsift.flows.auto_select import auto_selection, plot_trials, trials_table

            name, result, auto = auto_selection(store, config, frame)
            trials = trials_table(name, auto)
            recorder.staging.write_part("selection_trials", name, trials)
            plot_trials(trials, recorder.staging.artifact_path("reports", "selection_trials.png"))
            recorder.staging.write_part("selections", name, selection_table(result, name, frame["dataset"]))
            return {"selections": [name], "samples": data.num_rows, "reason": result.reason, "trials": len(trials)}
        for fraction in config.fractions:
            for seed in config.seeds:
                name = selection_name(config, fraction, seed)
                result = select_one(config, frame, fraction, seed)
                result.reason += rule_note
                recorder.staging.write_part("selections", name, selection_table(result, name, frame["dataset"]))
                if config.manifest:
                    order = np.argsort(result.rank, kind="stable")
                    kept = data.take(order[result.kept[order]]).select(["dataset", "sample_id", "label", "record"])
                    write_manifest(recorder.staging, name, kept)
                names.append(name)
        return {"selections": names, "samples": data.num_rows, **({"reason": rule_note[2:]} if rule_note else {})}

    return run_recorded("select", config, [], "", body)


def select(config: SelectConfig, prefect: bool = False) -> dict:
    """Seconds of work: ``select_run`` directly, or as the Prefect flow where ``flows.runner.use_prefect`` says."""
    return flow_or_direct(__name__, "select_flow", select_run, config, prefect)


__getattr__ = lazy_flows(globals(), {"select_flow": ("gradsift-select", select_run)})
