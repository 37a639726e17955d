"""The one base of every config model: unknown keys are errors (a typo never passes silently)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
