"""Typed configs of the proxy-training, selection and evaluation flows (descriptions feed --help)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gradsift.schemas.base import Config
from gradsift.schemas.config import DataSource, RayConfig
from gradsift.schemas.select import SelectionOptions

Budget = Literal["epochs", "steps"]
"""Retraining budget of a selection: the train run's epochs, or as many optimiser steps as all data."""

SCORE_NAMES = ("el2n", "grand", "forgetting", "aum", "vog", "self_influence", "loss", "grad_norm")
"""Scores a selection can rank by: a train run's dynamics scores, and loss / grad_norm of a score run."""


class TrainConfig(Config):
    """Proxy training: fine-tune a model on a dataset, log per-sample dynamics, checkpoint, score."""

    store: str = Field("store", description="Store folder (its DuckLake, checkpoints, artifacts).")
    data: DataSource = Field(description="Training data.")
    model: str = Field(
        "tiny", description="'tiny' (small random Llama), 'minilm' (the real encoder) or a model folder."
    )
    task: Literal["classification", "causal_lm"] = Field(
        "classification",
        description="Sequence classification (a head on the model, labels from the data) or causal LM "
        "('tiny' is always a causal LM).",
    )
    mode: Literal["finetune", "frozen"] = Field(
        "finetune",
        description="finetune: train the model (all weights, or LoRA adapters with lora=true); frozen: embed "
        "every text once with the encoder (mean-pooled, cached as Parquet) and train only a head on top.",
    )
    lora: bool = Field(False, description="finetune mode: train LoRA adapters instead of all weights.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    head_hidden: int = Field(0, ge=0, description="frozen mode: hidden units of the head (0: a linear head).")
    embed_cache: str | None = Field(
        None, description="frozen mode: embedding cache folder (default <store>/embeddings)."
    )
    max_length: int = Field(128, ge=8, description="Tokens per sample (longer ones are truncated).")
    epochs: int = Field(3, ge=1, description="Passes over the data; a checkpoint is saved after each.")
    batch_size: int = Field(32, ge=1, description="Samples per optimizer step.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    schedule: Literal["linear", "constant"] = Field("linear", description="Learning rate after warm-up.")
    seeds: list[int] = Field(default_factory=lambda: [0], description="One training run per seed (Ray tasks).")
    score_epoch: int = Field(
        1, ge=1, description="Early epoch whose checkpoint gives EL2N and GraNd (Paul et al. use an early epoch)."
    )
    aum_threshold_samples: bool = Field(
        False,
        description="AUM threshold samples (Pleiss et al. 2020): each seed relabels a random N/(C+1) of the samples "
        "to a fake class; the 99th percentile of their AUM is the threshold below which a sample is flagged as "
        "mislabelled (recorded in the run's note). Those samples get no scores from that seed.",
    )
    gradient_scores: bool = Field(
        True,
        description="Compute GraNd, VoG and TracIn self-influence (a per-sample gradient pass and an "
        "embedding-gradient pass per checkpoint, costing about two training epochs each); false keeps only the "
        "forward and dynamics scores (EL2N, loss, forgetting, AUM) and leaves those three null.",
    )
    vog_normalise: Literal["class", "dataset"] = Field("class", description="VoG z-normalisation: per class or all.")
    score_batch_size: int = Field(64, ge=1, description="Samples per forward when scoring checkpoints.")
    ray: RayConfig = Field(default_factory=RayConfig)

    toml_paths = ("store", "data.path", "embed_cache")

    @model_validator(mode="after")
    def _score_epoch_reached(self) -> TrainConfig:
        if self.score_epoch > self.epochs:
            raise ValueError(
                f"score_epoch {self.score_epoch} is after the last epoch ({self.epochs}): set score_epoch to at "
                f"most {self.epochs} or train for more epochs"
            )
        if self.model == "tiny":  # a small random Llama: a causal LM whatever the task says
            self.task = "causal_lm"
        return self


class SelectConfig(SelectionOptions):
    """Selections from a scored training run: keep a fraction by a score, random, or softmax-sampled."""

    store: str = Field("store", description="Store folder.")
    scores_run: str = Field(description="run_id of the train (or score) run whose scores select.")
    score: Literal[SCORE_NAMES] | None = Field(
        None, description=f"Score to select by: {', '.join(SCORE_NAMES)} (None: the random baseline)."
    )
    drop: Literal["easy", "hard"] | None = Field(
        None,
        description="Which end of the score is dropped; None: the direction rule reads the train run's dynamics "
        "(selection.direction: drop easy when the data are plentiful for the proxy, hard when scarce; Sorscher et "
        "al. 2022) and says so in selections.reason.",
    )
    method: Literal["keep", "softmax"] = Field(
        "keep", description="keep: deterministic by score; softmax: sample with probability softmax(score/T)."
    )
    temperature: float = Field(1.0, gt=0, description="softmax method: temperature (on z-scored scores).")
    stratify: Literal["none", "label", "domain"] = Field("label", description="Keep the same fraction per group.")
    manifest: bool = Field(True, description="Write Parquet and JSONL manifests with the original records.")
    auto: bool = Field(
        False,
        description="Choose score, direction and fraction on a validation split held out of the training data "
        "(frozen-mode train runs): every candidate retrained on cached embeddings, written to selection_trials.",
    )

    toml_paths = ("store",)


class EvaluateConfig(Config):
    """Retrain from the same start on each selection and measure held-out accuracy and loss."""

    store: str = Field("store", description="Store folder.")
    train_run: str = Field(description="run_id of the train run (its config gives model, mode and optimiser).")
    selection_runs: list[str] = Field(description="run_ids of select runs whose selections are evaluated.")
    eval_data: DataSource = Field(description="Held-out data with the same labels.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Retraining seeds per selection.")
    include_full: bool = Field(
        True, description="Also train on all data (fraction kept 1.0); off when an earlier evaluate has it."
    )
    budget: Budget = Field(
        "epochs",
        description="epochs: every selection trains for the train run's epochs (a pruned set costs less); steps: "
        "as many optimiser steps as all data (epochs scaled by all/kept), so selections are compared at equal "
        "compute.",
    )
    plot: str | None = Field(None, description="Where to write the accuracy-vs-fraction plot (default in the store).")
    ray: RayConfig = Field(default_factory=RayConfig)

    toml_paths = ("store", "eval_data.path", "plot")
