"""Typed results of the pipeline stages. Each serialises to its stage's resume marker in staging (a rerun
reads it back instead of redoing the stage) and is what later stages read; ``Stage.needs`` says which."""

from __future__ import annotations

from pydantic import Field

from gradsift.schemas.base import Config


class StageOutput(Config):
    """What a stage hands on. ``skipped`` says why a stage whose config section is absent did nothing."""

    skipped: str | None = None
    rows: int | None = Field(None, description="Rows the stage wrote (the stage-counts artifact).")


class IngestOutput(StageOutput):
    samples: int = 0
    samples_reused: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    shards: list[str] = Field(default_factory=list, description="Sample shards of the run, in source order.")
    task: str = "causal_lm"
    label_index: dict[str, int] | None = None


class ScoreOutput(StageOutput):
    shards_scored: int = 0
    shards_resumed: int = 0
    shards_reused: int = 0
    rows_scored: int = 0
    seconds: float = 0.0
    parameter_set: dict | None = None


class InfluenceOutput(StageOutput):
    targets: int = 0
    checkpoints: list[str] = Field(default_factory=list)
    blocks: int = 0
    seconds: float = 0.0
    alignment: list[dict[str, float]] = Field(default_factory=list, description="Per checkpoint: domain alignment.")
    domain_counts: dict[str, int] = Field(default_factory=dict)


class SelectionOutput(StageOutput):
    selection: str | None = None
    kept: int = 0
    weights: dict[str, float] | None = None


class ReportOutput(StageOutput):
    report: str | None = None
