"""Configuration of the per-sample gradient engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradsift.schemas.base import Config


class EngineConfig(Config):
    """What the per-sample gradient engine computes, and how."""

    parameters: Literal["all", "lora", "block_linear"] = Field(
        "all",
        description="Parameter set of the per-sample gradient: every trainable parameter of the model "
        "(linear weights and biases, embeddings, norms, LM head; the default), only the LoRA adapters (LESS), or "
        "only the nn.Linear layers inside the numbered blocks (no embeddings, norms or LM head: the set Bergson "
        "and Opacus' ghost clipping of a Llama cover, for comparisons at equal coverage).",
    )
    layer_stats: bool = Field(True, description="Per-layer, per-module gradient Frobenius norms.")
    nuclear_modules: list[str] = Field(
        default_factory=list,
        description="Module name suffixes whose per-sample gradient matrix gets a nuclear norm and "
        "sigma1/nuclear ratio (e.g. q_proj k_proj v_proj o_proj). Empty: none (they cost SVDs).",
    )
    feature_dim: int = Field(
        8192, ge=0, description="Total dimension of the projected gradient features (0: no features)."
    )
    projection_seed: int = Field(0, description="Seed of the random projections (features are reproducible).")
    loss_reduction: Literal["mean", "sum"] = Field(
        "mean", description="Per-sample loss over target tokens: mean cross-entropy, or sum (log-prob of a response)."
    )
    micro_batch_size: int = Field(16, ge=1, description="Samples per forward/backward; halved on out-of-memory.")
