"""The selection flow: selections from a train run's scores -> ``selections`` table + manifests.

Manifests (the kept samples' original records, in preference order) are written to
``<store>/manifests/<run_id>/<selection>.parquet`` and ``.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import flow

from gradsift.flows.runs import run_recorded
from gradsift.schemas.train import SelectConfig
from gradsift.selection.by_score import select_one, selection_name
from gradsift.selection.subsets import selection_table
from gradsift.storage.catalog import query
from gradsift.storage.store import Store, write_parquet_atomic


def write_manifest(folder: Path, name: str, kept: pa.Table) -> None:
    """Parquet and JSONL manifests of the kept samples (with their original records)."""
    write_parquet_atomic(kept, folder / f"{name}.parquet")
    tmp = folder / f".{name}.jsonl.tmp"
    with tmp.open("w") as fh:
        for row in kept.to_pylist():
            fh.write(json.dumps({**row, "record": json.loads(row["record"])}, ensure_ascii=False) + "\n")
    os.replace(tmp, folder / f"{name}.jsonl")


@flow(name="gradsift-select", log_prints=True)
def select_flow(config: SelectConfig) -> dict:
    """Write one selection per (fraction, seed) from the scores of ``config.scores_run``."""
    store = Store(config.store)
    column = config.score or "loss"
    data = query(
        store,
        f"SELECT s.dataset, s.sample_id, s.{column}, s.never_learned, m.label, m.domain, m.record "
        "FROM scores s JOIN samples m USING (dataset, sample_id) "
        f"WHERE s.run_id = '{config.scores_run}' ORDER BY s.dataset, s.sample_id",
    )
    if data.num_rows == 0:
        raise ValueError(f"no scores of run {config.scores_run!r} in {store.root}: run `gradsift train` first")
    if config.score and data.column(config.score).null_count == data.num_rows:
        raise ValueError(
            f"run {config.scores_run!r} has no {config.score} scores (trained with gradient_scores=false): "
            "select by el2n, forgetting or aum, or train again with gradient scores"
        )
    frame = {name: data.column(name).to_numpy(zero_copy_only=False) for name in data.column_names}
    frame["never_learned"] = frame["never_learned"].astype(bool)

    def body(recorder) -> dict:
        names = []
        for fraction in config.fractions:
            for seed in config.seeds:
                name = selection_name(config, fraction, seed)
                result = select_one(config, frame, fraction, seed)
                recorder.staging.write_part("selections", name, selection_table(result, name, frame["dataset"]))
                if config.manifest:
                    order = np.argsort(result.rank, kind="stable")
                    kept = data.take(order[result.kept[order]]).select(["dataset", "sample_id", "label", "record"])
                    write_manifest(store.root / "manifests" / recorder.run_id, name, kept)
                names.append(name)
        return {"selections": names, "samples": data.num_rows}

    return run_recorded("select", config, [], "", body)
