"""Arrow schemas of every table: the contract users write SQL against (see DESIGN.md, "Tables").

Staged parts hold these columns; the lake (storage.lake) adds ``run_id`` (and ``score_key`` to the scoring tables)
as a run commits them.
"""

from __future__ import annotations

import pyarrow as pa

RUNS = pa.schema(
    [
        ("run_id", pa.string()),
        ("flow", pa.string()),
        ("status", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("config", pa.string()),  # resolved config, JSON
        ("model", pa.string()),
        ("checkpoint", pa.string()),
        ("parameter_set", pa.string()),  # JSON: which parameters the gradients cover
        ("code_version", pa.string()),
        ("rows_written", pa.int64()),
        ("note", pa.string()),
        ("score_key", pa.string()),  # the scoring key of the rows it scored (scores.score_key), null if none
    ]
)

SAMPLES = pa.schema(
    [
        ("dataset", pa.string()),
        ("sample_id", pa.string()),  # content hash
        ("shard", pa.string()),
        ("domain", pa.string()),
        ("label", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("text", pa.string()),  # prompt + response, or the text field
        ("text_pair", pa.string()),  # a sentence pair's second text (null for single texts)
        ("n_tokens", pa.int32()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("record", pa.string()),  # the original record, JSON, for manifests
    ]
)

QUARANTINE = pa.schema(
    [
        ("dataset", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),  # a short category, one of gradsift.data.reasons.REASONS
        ("detail", pa.string()),  # the specifics: line numbers, counts, field names
        ("raw", pa.string()),
    ]
)

SCORES = pa.schema(
    [
        ("checkpoint", pa.string()),
        ("dataset", pa.string()),
        ("sample_id", pa.string()),
        ("loss", pa.float32()),
        ("grad_norm", pa.float32()),
        ("el2n", pa.float32()),
        ("grand", pa.float32()),
        ("forgetting", pa.int32()),
        ("never_learned", pa.bool_()),
        ("aum", pa.float32()),
        ("vog", pa.float32()),
        ("self_influence", pa.float32()),
    ]
)
"""One schema for every scorer: each run fills the columns it computes and leaves the rest null."""

LAYER_STATS = pa.schema(
    [
        ("checkpoint", pa.string()),
        ("dataset", pa.string()),
        ("sample_id", pa.string()),
        ("layer", pa.int32()),
        ("module", pa.string()),
        ("grad_norm", pa.float32()),
        ("nuclear_norm", pa.float32()),
        ("sigma1_ratio", pa.float32()),
    ]
)


def features_schema(dim: int) -> pa.Schema:
    """Projected gradient features: float16 fixed-size lists of the run's dimension."""
    return pa.schema(
        [
            ("checkpoint", pa.string()),
            ("dataset", pa.string()),
            ("sample_id", pa.string()),
            ("feature", pa.list_(pa.float16(), dim)),
        ]
    )


INFLUENCE = pa.schema(
    [
        ("target", pa.string()),
        ("method", pa.string()),
        ("dataset", pa.string()),
        ("sample_id", pa.string()),
        ("score", pa.float64()),
        ("rank", pa.int64()),
    ]
)

MIXTURES = pa.schema(
    [
        ("domain", pa.string()),
        ("weight", pa.float64()),
        ("alignment", pa.float64()),
        ("prior", pa.float64()),
        ("n_samples", pa.int64()),
    ]
)

SELECTIONS = pa.schema(
    [
        ("selection", pa.string()),
        ("dataset", pa.string()),
        ("sample_id", pa.string()),
        ("kept", pa.bool_()),
        ("rank", pa.int64()),
        ("reason", pa.string()),
    ]
)

INFLUENCE_TOPK = pa.schema(
    [
        ("target", pa.string()),
        ("method", pa.string()),
        ("target_dataset", pa.string()),
        ("target_sample_id", pa.string()),
        ("rank", pa.int64()),  # 0 = most influential training sample for this target sample
        ("dataset", pa.string()),
        ("sample_id", pa.string()),
        ("score", pa.float64()),
    ]
)
"""The most influential training samples per target sample (blocked streaming top-k)."""

PAIR_SCORES = pa.schema(
    [
        ("dataset", pa.string()),
        ("pair_id", pa.string()),  # content hash of (prompt, chosen, rejected)
        ("line", pa.int64()),
        ("dot", pa.float64()),  # <g_chosen, g_rejected>
        ("cosine", pa.float64()),
        ("norm_chosen", pa.float64()),
        ("norm_rejected", pa.float64()),
        ("condition_ratio", pa.float64()),  # <g_w, g_l> / min(||g_w||^2, ||g_l||^2)
        ("logp_chosen", pa.float64()),
        ("logp_rejected", pa.float64()),
        ("truncated", pa.bool_()),  # cut to max_tokens: prompt end and response start kept
    ]
)
"""Gradient entanglement per preference pair (Yuan et al., ICLR 2025), gradients of summed response log-probs."""

LAYER_CURVES = pa.schema(
    [
        ("dataset", pa.string()),
        ("variant", pa.string()),  # e.g. fast (answer only) / slow (full solution)
        ("layer", pa.int32()),
        ("module", pa.string()),
        ("nuclear_norm", pa.float64()),  # mean over samples
        ("grad_norm", pa.float64()),
        ("n_samples", pa.int64()),
    ]
)

LAYER_DIFFS = pa.schema(
    [
        ("dataset", pa.string()),
        ("module", pa.string()),
        ("part", pa.string()),  # early / middle / late third of the layers
        ("variant_a", pa.string()),
        ("variant_b", pa.string()),
        ("mean_abs_diff", pa.float64()),
    ]
)

DYNAMICS = pa.schema(
    [
        ("checkpoint", pa.string()),  # the seed's train run id: <run_id>-seed<k>
        ("epoch", pa.int32()),
        ("step", pa.int64()),
        ("dataset", pa.string()),
        ("sample_id", pa.string()),
        ("loss", pa.float32()),
        ("correct", pa.bool_()),
        ("margin", pa.float32()),  # gold logit minus the largest other
        ("pred", pa.int32()),  # predicted class (-1 for causal LMs)
        ("el2n", pa.float32()),
    ]
)
"""Training dynamics: one row each time a training step sees a sample (train flow)."""

CAPTURE_VISITS = pa.schema(
    [
        *DYNAMICS,  # checkpoint is the capture run's name
        ("grad_norm", pa.float32()),  # || grad_w loss_i || of the training step's own backward
        ("n_tokens", pa.int32()),  # target tokens (1 for a classifier)
        ("token_loss_max", pa.float32()),  # the worst target token's loss (the loss for a classifier)
        ("lr", pa.float64()),  # learning rate of the optimiser step the visit belongs to
        ("rank", pa.int32()),  # data-parallel rank that recorded it
    ]
)
"""Per-sample visits recorded inside a user's own training run (gradsift.capture), one row per sample per visit."""


def capture_features_schema(dim: int) -> pa.Schema:
    """Projected gradient features recorded during training: one row per sample per visit."""
    return pa.schema([("step", pa.int64()), ("rank", pa.int32()), *features_schema(dim)])


EVALUATIONS = pa.schema(
    [
        ("selection", pa.string()),
        ("score", pa.string()),  # score selected by, "random", or "all"
        ("drop", pa.string()),
        ("fraction_kept", pa.float64()),
        ("seed", pa.int32()),
        ("n_train", pa.int64()),
        ("epochs", pa.int32()),  # epochs retrained: the train run's, or more under budget="steps"
        ("accuracy", pa.float64()),
        ("loss", pa.float64()),
    ]
)
"""Held-out accuracy and loss of a model retrained on a selection (evaluate flow)."""

SELECTION_TRIALS = pa.schema(
    [
        ("selection", pa.string()),  # the auto selection the trial belongs to
        ("candidate", pa.string()),  # e.g. "el2n-drop-easy-keep0.55", "random-keep0.55", "all"
        ("score", pa.string()),  # score selected by, "random", or "all"
        ("drop", pa.string()),  # "easy", "hard" or "" (random, all)
        ("fraction_kept", pa.float64()),
        ("seed", pa.int32()),
        ("n_train", pa.int64()),
        ("n_validation", pa.int64()),
        ("accuracy", pa.float64()),  # on the validation split held out of the training data
        ("chosen", pa.bool_()),
    ]
)
"""One retraining of ``select --auto``: a candidate subset of the training data measured on the split held out of it."""

# Table name -> schema for tables with a fixed schema. ``features`` is built per dimension.
TABLES: dict[str, pa.Schema] = {
    "runs": RUNS,
    "samples": SAMPLES,
    "quarantine": QUARANTINE,
    "scores": SCORES,
    "layer_stats": LAYER_STATS,
    "influence": INFLUENCE,
    "mixtures": MIXTURES,
    "selections": SELECTIONS,
    "influence_topk": INFLUENCE_TOPK,
    "pair_scores": PAIR_SCORES,
    "layer_curves": LAYER_CURVES,
    "layer_diffs": LAYER_DIFFS,
    "dynamics": DYNAMICS,
    "evaluations": EVALUATIONS,
    "capture_visits": CAPTURE_VISITS,
    "selection_trials": SELECTION_TRIALS,
}
VIEW_NAMES = [*TABLES, "features"]

SCORE_TABLES = ("features", "layer_stats", "scores")
"""What scoring writes per shard, in write order: a shard is done once its scores part exists."""
