"""Configuration of the downstream curation stages: influence on a target set, mixture weights,
preference-pair entanglement, fast/slow layer curves, the report. Field descriptions feed the CLI
help and the README. No import of the rest of gradsift.schemas.config (it imports this module)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gradsift.schemas.base import Config

Method = Literal["less", "tracin", "cosine"]


class CheckpointsConfig(Config):
    """Training checkpoints (``<store>/checkpoints/<train_run>/step-NNNNNN/``) the influence is taken over."""

    train_run: str = Field(description="Training run id whose checkpoints are used.")
    store: str | None = Field(None, description="Store holding the checkpoints; default: this run's store.")
    steps: list[int] | None = Field(None, description="Checkpoint steps to use; default: every checkpoint.")


class InfluenceConfig(Config):
    """Which training samples help a target set (LESS, TracIn, gradient cosine)."""

    name: str = Field("target", description="Name of the target in the influence and selections tables.")
    datasets: list[str] = Field(
        description="Datasets (among the ingested sources) forming the target set; each dataset is one subtask "
        "(LESS: mean over a subtask's samples, max over subtasks). They are never selected."
    )
    methods: list[Method] = Field(
        default_factory=lambda: ["cosine", "tracin"],
        description="less: Adam-direction cosine summed over checkpoints with their learning rates (needs "
        "checkpoints); tracin: learning-rate-weighted dot products of gradients; cosine: mean gradient cosine.",
    )
    checkpoints: CheckpointsConfig | None = Field(
        None, description="LoRA checkpoints with optimizer state; default: the score stage's features (one point)."
    )
    feature_dim: int = Field(8192, ge=16, description="Projected feature dimension at checkpoints.")
    block_rows: int = Field(32768, ge=1, description="Training rows per streaming block (bounds memory).")
    top_k: int = Field(10, ge=0, description="Most influential training samples kept per target sample (report).")
    select_fraction: float = Field(
        0.05, gt=0, le=1, description="The selection preset keeps this top fraction for the target."
    )
    select_method: Method | None = Field(None, description="Score the selection ranks by; default: the first method.")

    @model_validator(mode="after")
    def _less_needs_checkpoints(self) -> InfluenceConfig:
        if "less" in self.methods and self.checkpoints is None:
            raise ValueError("method 'less' needs checkpoints (optimizer state): set influence.checkpoints")
        if self.select_method is not None and self.select_method not in self.methods:
            raise ValueError(f"select_method {self.select_method!r} is not one of methods {self.methods}")
        return self


class MixtureConfig(Config):
    """Offline domain mixture weights from gradient alignment with the target (DGA / DoGE)."""

    eta: float = Field(10.0, ge=0, description="Step size of the exponentiated-gradient update.")
    smoothing: float = Field(0.1, ge=0, le=1, description="Weight of the prior mixed back into the weights.")
    prior: dict[str, float] | None = Field(None, description="Prior weight per domain; default: domain sizes.")
    budget: int | None = Field(None, ge=1, description="Samples the mixture selection draws; default: 10% of the pool.")


class ReportConfig(Config):
    """The run report: plots as PNG and one HTML page under <store>/reports/<run_id>/."""

    enabled: bool = Field(True, description="Write the report (and the Prefect markdown artifact).")
    top_n: int = Field(10, ge=1, description="Top influential samples listed per target and method.")


PairLayout = Literal["auto", "prompt", "hh", "conversations", "messages"]


class PairsConfig(Config):
    """Gradient entanglement of preference pairs (Yuan et al., ICLR 2025)."""

    dataset: str | None = Field(None, description="Name of the pair set in pair_scores; default: the file's stem.")
    layout: PairLayout = Field(
        "auto",
        description="How a row holds its pair. prompt: a prompt string and chosen/rejected strings; hh: chosen and "
        "rejected are full hh-rlhf dialogues, split at the last 'Assistant:' turn; conversations: a list of "
        "{from, value} turns and chosen/rejected {from, value} turns (or strings); messages: chosen/rejected are "
        "[{role, content}] lists sharing the prompt turns, or continuations of a prompt message list. auto: picked "
        "per row (conversations field -> conversations; prompt list -> messages; prompt string -> prompt; "
        "chosen list -> messages; else hh).",
    )
    chosen: str = Field("chosen", description="Field of the chosen response (or full dialogue / message list).")
    rejected: str = Field("rejected", description="Field of the rejected response (or full dialogue / message list).")
    prompt: str = Field("prompt", description="Field of the prompt (a string, or a message list).")
    conversations: str = Field(
        "conversations", description="Field of the shared prompt turns as a list of {from, value} objects."
    )
    limit: int | None = Field(None, ge=1, description="Use the first N usable pairs only.")
    exact: bool = Field(
        True, description="Inner products from materialised gradients (exact); false: from projected features."
    )


class FastSlowConfig(Config):
    """Fast vs slow thinking layer curves (Li et al. 2024, Layer_Gradient) on gsm8k-style data."""

    dataset: str | None = Field(None, description="Name in the tables; default: the file's stem.")
    question: str = Field("question", description="Field of the question.")
    answer: str = Field("answer", description="Field of the full solution; the fast variant keeps the text after ####.")
    limit: int | None = Field(500, ge=1, description="Use the first N problems.")
    modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Modules whose per-sample gradient nuclear norms are compared.",
    )
