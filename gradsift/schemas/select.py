"""Typed configs shared by ``select`` and the nightly flow: what a selection keeps and what ``--auto`` may try."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradsift.schemas.base import Config


class SelectionOptions(Config):
    """Fractions, seeds and what ``--auto`` may spend: shared by ``select`` and the nightly ``auto_select`` section."""

    fractions: list[float] = Field(
        default_factory=lambda: [0.85, 0.7, 0.55, 0.4], description="Fractions of the data kept, one selection each."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], description="Seeds (random baseline, softmax, ties; --auto: 0-2 unless >= 2)."
    )
    budget: int = Field(60, ge=1, description="--auto: at most this many retrainings (candidates x seeds).")
    validation: float = Field(0.2, gt=0, lt=1, description="--auto: fraction of the training data held out.")
    when_none_wins: Literal["all", "random"] = Field(
        "all", description="--auto: what is kept when no candidate beats random by more than the seed spread."
    )


class AutoSelectConfig(SelectionOptions):
    """The nightly ``select --auto``: the run's ingested, labelled samples embedded by a frozen encoder (cached), a
    head proxy and every candidate trained on a validation split of them (selection.auto)."""

    encoder: str = Field("minilm", description="'minilm' (the real encoder) or a local encoder folder.")
    max_length: int = Field(128, ge=8, description="Tokens per sample (sentence pairs jointly).")
    epochs: int = Field(10, ge=1, description="Epochs of the head proxy and of every trial.")
    embed_cache: str | None = Field(None, description="Embedding cache folder (default <store>/embeddings).")
