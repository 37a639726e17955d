"""Typed configuration of every flow. Field descriptions feed the CLI's --help and the README."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from gradsift.schemas.base import Config
from gradsift.schemas.engine import EngineConfig
from gradsift.schemas.influence import FastSlowConfig, InfluenceConfig, MixtureConfig, PairsConfig, ReportConfig
from gradsift.schemas.select import AutoSelectConfig


class DataSource(Config):
    """One input file and how its fields map onto samples."""

    path: str = Field(description="A .jsonl, .json (list of records), .csv, .tsv or .parquet file.")
    dataset: str | None = Field(None, description="Dataset name in the tables; default: the file's stem.")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet"] = Field(
        "auto", description="File format; auto picks by extension."
    )
    prompt: str | None = Field("prompt", description="Field holding the prompt (loss then covers the response only).")
    response: str | None = Field("response", description="Field holding the response.")
    text: str | None = Field("text", description="Field holding the whole text when there is no prompt/response.")
    text_pair: str | None = Field(
        None,
        description="Field holding a sentence pair's second text (NLI hypothesis, paraphrase, QA context): the "
        "encoder sees (text, text_pair) as a pair (token type ids); when set, a row without it is quarantined.",
    )
    messages: str | None = Field(
        "messages",
        description="Field holding chat messages [{role, content}]; the last assistant turn is the response.",
    )
    label: str | None = Field("label", description="Field holding a class label (optional).")
    domain: str | None = Field("domain", description="Field holding the domain (optional).")
    id: str | None = Field("id", description="Field holding the record's own id (optional; checked for conflicts).")
    constant_domain: str | None = Field(None, description="Domain given to every row of this file.")
    columns: list[str] | None = Field(
        None, description="Column names for a CSV/TSV without a header row (e.g. ['text', 'label'])."
    )

    @property
    def name(self) -> str:
        return self.dataset or Path(self.path).name.split(".")[0]


class ModelConfig(Config):
    """Which model scores the data."""

    name_or_path: str = Field("tiny", description="'tiny' (a small random Llama) or a local Hugging Face model folder.")
    task: Literal["auto", "causal_lm", "classification"] = Field(
        "auto",
        description="auto: a sequence classifier when num_labels or labels is set or the folder holds one (its "
        "head's classes), else a causal LM; classification without num_labels or labels: the classes are the "
        "labels found in the data.",
    )
    num_labels: int | None = Field(None, ge=1, description="For a sequence classifier: number of classes.")
    labels: list[str] | None = Field(
        None,
        description="Class names in index order (sets num_labels). Without them a classifier's labels must be "
        "the integers 0..num_labels-1. Rows with another label are quarantined at ingest.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype on GPU.")
    max_tokens: int = Field(512, ge=8, description="Samples longer than this after tokenisation are quarantined.")
    checkpoint: str = Field("final", description="Name of the checkpoint being scored (stored with each row).")

    @model_validator(mode="after")
    def _labels_fix_num_labels(self) -> ModelConfig:
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels) or not self.labels:
                raise ValueError(f"labels must be distinct class names, got {self.labels}")
            if self.num_labels not in (None, len(self.labels)):
                raise ValueError(f"num_labels {self.num_labels} does not match the {len(self.labels)} labels given")
            self.num_labels = len(self.labels)
        if self.task == "causal_lm" and self.num_labels is not None:
            raise ValueError("task causal_lm takes no num_labels or labels")
        if self.name_or_path == "tiny" and (self.num_labels is not None or self.task == "classification"):
            raise ValueError("'tiny' is a causal LM: a classifier (num_labels, labels) needs a model folder")
        return self


class RayConfig(Config):
    """Where and how wide the heavy work runs."""

    address: str | None = Field(
        default_factory=lambda: os.environ.get("RAY_ADDRESS") or None,
        description="Ray cluster address (auto, ray://host:10001); default RAY_ADDRESS, else a local Ray.",
    )
    num_actors: int = Field(2, ge=1, description="Scoring actors (each loads the model once).")
    in_process_max_shards: int = Field(
        2,
        ge=0,
        description="Without a Ray cluster (no address), run at most this many shards (items of work) in this process "
        "instead of starting a local Ray (which with its actors costs about half a minute); 0: always Ray.",
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each actor declares.")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs each actor declares (1 on GPU machines).")
    max_restarts: int = Field(2, ge=0, description="Times a dead actor is restarted.")
    max_task_retries: int = Field(2, ge=0, description="Times a shard is retried after its worker died.")
    dashboard: bool = Field(
        False, description="Start the Ray dashboard (web UI on 127.0.0.1:8265) with a local Ray; a cluster has its own."
    )


class IngestConfig(Config):
    """How files become samples."""

    sources: list[DataSource] = Field(default_factory=list, description="Input files.")
    shard_size: int = Field(256, ge=1, description="Samples per shard (the unit of scoring work and resume).")
    on_bad_file: Literal["skip", "fail"] = Field(
        "skip",
        description="A file that cannot be read at all: skip it (a quarantine row at line 0 names it and the run "
        "goes on with the other files) or fail the run.",
    )
    max_row_bytes: int = Field(
        4 << 20, ge=1024, description="Rows (lines, records) longer than this many bytes are quarantined unparsed."
    )


class ScoreConfig(Config):
    """What the scoring stage computes."""

    engine: EngineConfig = Field(default_factory=EngineConfig)


class RunConfig(Config):
    """The resolved configuration of a scoring or nightly run (stored in the runs table)."""

    store: str = Field("store", description="Store folder holding its DuckLake (lake.sqlite + lake_data/), staging and artifacts.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    seed: int = Field(0, description="Seed of everything random in the run.")

    toml_paths = ("store", "ingest.sources.*.path")

    @model_validator(mode="after")
    def _sources_exist(self) -> RunConfig:
        missing = [s.path for s in self.ingest.sources if not Path(s.path).exists()]
        if missing:
            raise ValueError(f"input files not found: {', '.join(missing)}")
        return self


class NightlyConfig(RunConfig):
    """The nightly curation run: ingest -> score -> downstream stages, on a schedule."""

    schedule: str = Field("0 2 * * *", description="Cron schedule of the nightly deployment (UTC).")
    target: InfluenceConfig | None = Field(None, description="Influence on a target set (skipped when absent).")
    mixture: MixtureConfig | None = Field(
        None, description="Domain mixture weights toward the target (needs target; skipped when absent)."
    )
    report: ReportConfig = Field(default_factory=ReportConfig, description="The run report.")
    auto_select: AutoSelectConfig | None = Field(
        None,
        description="select --auto on the run's labelled samples (not the targets'): score, direction and fraction "
        "chosen on a held-out validation split; skipped when absent.",
    )

    toml_paths = (*RunConfig.toml_paths, "target.checkpoints.store", "auto_select.embed_cache")

    @model_validator(mode="after")
    def _target_datasets_ingested(self) -> NightlyConfig:
        if self.mixture is not None and self.target is None:
            raise ValueError("mixture weights need a target section")
        if self.target is not None:
            names = {s.name for s in self.ingest.sources}
            missing = [d for d in self.target.datasets if d not in names]
            if missing:
                raise ValueError(f"target datasets {missing} are not among the ingested sources {sorted(names)}")
            if not names - set(self.target.datasets):
                raise ValueError("every ingested dataset is a target: nothing left to select from")
        return self


class AnalyzeConfig(RunConfig):
    """Gradient analyses of one file: preference-pair entanglement, or fast vs slow layer curves."""

    pairs: PairsConfig | None = Field(None, description="Entanglement of chosen/rejected pairs.")
    fast_slow: FastSlowConfig | None = Field(None, description="Fast vs slow thinking layer curves.")
    data: str = Field(description="The input file (.jsonl, .jsonl.gz, .json).")

    toml_paths = (*RunConfig.toml_paths, "data")

    @model_validator(mode="after")
    def _one_analysis(self) -> AnalyzeConfig:
        if (self.pairs is None) == (self.fast_slow is None):
            raise ValueError("give exactly one of pairs or fast_slow")
        if not Path(self.data).exists():
            raise ValueError(f"input file not found: {self.data}")
        return self
