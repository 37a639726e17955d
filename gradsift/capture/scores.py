"""Training-dynamics scores of a captured run, computed from its record with the same functions as the
proxy run's (``gradsift train``): ``training.loop.visit_scores`` (forgetting, never-learned, AUM) and
``signals.dynamics.combine_seeds`` (the captured run is one seed), into ``scores`` via ``scores_table``.

Per sample, from its visits in step order: EL2N and GraNd at its visit in epoch ``score_epoch`` (Paul et al.
2021: early in training; here the model of that step, not an end-of-epoch checkpoint), loss at its last visit,
TracIn self-influence sum_visits lr * ||g||^2 (Pruthi et al. 2020, with every visit as a checkpoint), forgetting
and AUM over all visits.

VoG is null for a captured run, by design. VoG (Agarwal et al. 2022) is the variance across checkpoints of the
gradient of the gold-label logit w.r.t. the embedding-layer output, at fixed inputs (eval mode). The training
step's backward gives the gradient of the loss w.r.t. that output instead: a softmax-weighted mix over every
logit's gradient (for two classes -(1 - p_y) times the gradient of the margin, not of the gold logit), under
dropout. The gold logit's needs a second backward per visit, which in-run capture does not add (``gradsift
train`` runs it at its checkpoints). Nor can the record hold it cheaply: it is T x H floats per sample and
visit; even a running variance keeps 2 N T H floats (about 2 GB for 5,000 samples at 128 tokens x 384).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gradsift.capture.record import VISITS
from gradsift.capture.session import capture_run_id
from gradsift.schemas.capture import FromRunConfig
from gradsift.schemas.tables import DYNAMICS
from gradsift.signals.dynamics import combine_seeds
from gradsift.storage.store import Store
from gradsift.training.loop import scores_table, visit_scores


def record_visits(visits: pa.Table) -> pa.Table:
    """One visit per (sample, epoch): the lowest rank's (DistributedSampler repeats a few samples across ranks
    to even the shards out); in (sample, step) order."""
    df = visits.to_pandas().sort_values(["dataset", "sample_id", "epoch", "rank", "step"], kind="stable")
    df = df.drop_duplicates(["dataset", "sample_id", "epoch"], keep="first").sort_values(["sample_id", "step"])
    return pa.Table.from_pandas(df, preserve_index=False)


def record_scores(visits: pa.Table, score_epoch: int = 1) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """(samples [dataset, sample_id], per-sample score columns) of one run's deduplicated visits."""
    df = visits.to_pandas()
    samples = df.drop_duplicates(["dataset", "sample_id"])[["dataset", "sample_id"]].sort_values("sample_id")
    ids = samples["sample_id"].tolist()
    counts = df.groupby("sample_id").size()
    if counts.nunique() != 1:
        raise ValueError(
            f"captured visits per sample differ ({counts.min()}-{counts.max()}): a run cut short mid-epoch? "
            "score a record of whole epochs"
        )
    out = visit_scores(visits.select(DYNAMICS.names), ids)
    by_id = df.set_index("sample_id")
    early = df[df["epoch"] == score_epoch].set_index("sample_id")
    if early.index.nunique() != len(ids):
        raise ValueError(f"score_epoch={score_epoch}: not every sample has a visit in that epoch")
    last = df.sort_values("step").groupby("sample_id").last()
    out["el2n"] = early.loc[ids, "el2n"].to_numpy(np.float64)
    out["grand"] = early.loc[ids, "grad_norm"].to_numpy(np.float64)
    out["loss"] = last.loc[ids, "loss"].to_numpy(np.float64)
    tracin = (by_id["lr"] * by_id["grad_norm"].astype(np.float64) ** 2).groupby(level=0).sum()
    out["self_influence"] = tracin.loc[ids].to_numpy(np.float64)
    out["vog"] = np.full(len(ids), np.nan)
    return pa.Table.from_pandas(samples, preserve_index=False), out


def read_record(store: Store, run_id: str) -> pa.Table:
    """The run's visits: staged (training still writing, or not scored yet) or committed."""
    staged = store.staging(run_id).read(VISITS)
    if staged is not None:
        return staged
    committed = store.run_table(VISITS, run_id) if store.exists() else None
    if committed is None or committed.num_rows == 0:
        raise FileNotFoundError(f"no captured visits of run {run_id!r} in {store.root}")
    return committed


def captured_scores(visits: pa.Table, run_id: str, score_epoch: int = 1) -> pa.Table:
    """The ``scores`` rows of a captured run (one seed through ``combine_seeds``, as ``gradsift train``)."""
    samples, cols = record_scores(record_visits(visits), score_epoch)
    frame = pa.table({"sample_id": samples["sample_id"], **cols}).to_pandas().set_index("sample_id")
    combined = combine_seeds([frame], None, gradient_scores=False)
    return scores_table(run_id, samples["dataset"].to_pylist(), samples["sample_id"].to_pylist(), combined)


def score_captured_run(config: FromRunConfig) -> dict:
    """``gradsift scores from-run RUN``: the captured run's record -> ``dynamics`` and ``scores``, committed with
    the record as run ``capture-<RUN>`` (so ``select --scores-run capture-<RUN>`` and ``evaluate`` work)."""
    from gradsift.flows.runs import RunRecorder

    store = Store(config.store).ensure()
    run_id = config.run if config.run.startswith("capture-") else capture_run_id(config.run)
    visits = record_visits(read_record(store, run_id))
    recorder = RunRecorder(store, run_id, "capture", config, "", run_id)
    recorder.start()
    try:
        scores = captured_scores(visits, run_id, config.score_epoch)
        recorder.staging.write_part("dynamics", "capture", visits.select(DYNAMICS.names).cast(DYNAMICS))
        recorder.staging.write_part("scores", "capture", scores)
        result = {"samples": scores.num_rows, "visits": visits.num_rows}
        recorder.complete(result)
    except BaseException as err:
        recorder.fail(err)
        raise
    return {"run_id": run_id, **result}
