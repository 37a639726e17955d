"""The one base of every config model: unknown keys are errors (a typo never passes silently), and a TOML file
loads into any of them with the relative paths inside it taken relative to the file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    toml_paths: ClassVar[tuple[str, ...]] = ()
    """Dotted keys of the fields that hold file paths (``*``: every element of a list), resolved by ``toml_data``."""

    @classmethod
    def toml_data(cls, path: str | Path) -> dict:
        """A TOML file's table, unvalidated, with the relative paths at ``toml_paths`` made relative to the file."""
        path = Path(path)
        data = tomllib.loads(path.read_text())
        base = path.parent.resolve()
        for key in cls.toml_paths:
            _resolve(data, key.split("."), base)
        return data

    @classmethod
    def from_toml(cls, path: str | Path) -> Self:
        """Load a config file; relative paths inside it are relative to the file."""
        return cls.model_validate(cls.toml_data(path))


def _resolve(node, keys: list[str], base: Path) -> None:
    """Resolve the path at ``keys`` under ``node``; wrong shapes are left to validation to name."""
    key, rest = keys[0], keys[1:]
    children = node if key == "*" and isinstance(node, list) else []
    if key != "*" and isinstance(node, dict) and key in node:
        if not rest:
            if isinstance(node[key], str):
                node[key] = str((base / node[key]).resolve())
            return
        children = [node[key]]
    for child in children:
        if rest:
            _resolve(child, rest, base)
