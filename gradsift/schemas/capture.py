"""Configuration of in-run capture (gradsift.capture): what a user's own training run records per sample."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradsift.schemas.base import Config


class CaptureConfig(Config):
    """What the capture hooks record on the training step's own forward/backward, and how it is stored."""

    store: str = Field("store", description="Store folder the record and the scores are written to.")
    parameters: Literal["all", "lora"] = Field(
        "all", description="Parameter set of the recorded gradient norm: every trainable parameter or the LoRA adapters."
    )
    feature_dim: int = Field(0, ge=0, description="Projected gradient features per visit (0: norms only).")
    projection_seed: int = Field(0, description="Seed of the random projections (features are reproducible).")
    flush_every: int = Field(50, ge=1, description="Optimiser steps between writes of the record (bounds memory).")
    score_epoch: int = Field(1, ge=1, description="Epoch whose visits give EL2N and GraNd (Paul et al.: early).")


class FromRunConfig(Config):
    """``gradsift scores from-run RUN``: the dynamics scores of a captured run, from its record."""

    store: str = Field("store", description="Store folder holding the run's record.")
    run: str = Field(description="The captured run: its name (as given to capture) or capture-<name>.")
    score_epoch: int = Field(1, ge=1, description="Epoch whose visits give EL2N and GraNd (Paul et al.: early).")
