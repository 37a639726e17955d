"""Typed keys for names that are stored as strings: the one place they are built and parsed.

* ``ShardKey``: a shard of samples, named ``<dataset>-<index:05d>-<digest>`` (part names of ``samples``,
  ``scores``, ... and the ``shard`` column).
* ``FeaturePart``: a part of the ``features`` table, ``<shard>`` or, for features at a training checkpoint,
  ``<shard>@<checkpoint>``.
* ``CheckpointFeature``: a value of the ``features.checkpoint`` column at a training checkpoint,
  ``<checkpoint>:<kind>`` with kind "grad" (projected gradient) or "adam" (LESS's Adam direction).

The stored strings are unchanged; code builds them with ``.name`` / ``.value`` and reads them back with
``parse``, never with ad-hoc splitting.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

FeatureKind = Literal["grad", "adam"]
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)

_SHARD = re.compile(r"(?P<dataset>.+)-(?P<index>\d{5,})-(?P<digest>[0-9a-f]{10})")


@dataclass(frozen=True)
class ShardKey:
    """One shard: its dataset, its position in the file (0, 1, ...) and a hash of its sample ids."""

    dataset: str
    index: int
    digest: str

    @classmethod
    def of(cls, dataset: str, index: int, sample_ids: Iterable[str]) -> ShardKey:
        """The key of shard ``index`` of ``dataset`` holding ``sample_ids`` (in order)."""
        return cls(dataset, index, hashlib.sha256("".join(sample_ids).encode()).hexdigest()[:10])

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.index:05d}-{self.digest}"

    @classmethod
    def parse(cls, name: str) -> ShardKey:
        match = _SHARD.fullmatch(name)
        if match is None:
            raise ValueError(f"not a shard name (<dataset>-<index>-<digest>): {name!r}")
        return cls(match["dataset"], int(match["index"]), match["digest"])


@dataclass(frozen=True)
class FeaturePart:
    """The name of one ``features`` part: a shard's features, at a training checkpoint or not."""

    shard: str
    checkpoint: str | None = None

    SEP = "@"

    @property
    def name(self) -> str:
        return self.shard if self.checkpoint is None else f"{self.shard}{self.SEP}{self.checkpoint}"

    @classmethod
    def parse(cls, name: str) -> FeaturePart:
        shard, sep, checkpoint = name.partition(cls.SEP)
        if sep and not checkpoint:
            raise ValueError(f"feature part {name!r} names no checkpoint after {cls.SEP!r}")
        return cls(shard, checkpoint if sep else None)


@dataclass(frozen=True)
class CheckpointFeature:
    """A ``features.checkpoint`` value at a training checkpoint: which checkpoint and which kind of feature."""

    checkpoint: str
    kind: FeatureKind

    SEP = ":"

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {self.kind!r}")

    @property
    def value(self) -> str:
        return f"{self.checkpoint}{self.SEP}{self.kind}"

    @classmethod
    def parse(cls, value: str) -> CheckpointFeature:
        checkpoint, sep, kind = value.rpartition(cls.SEP)
        if not sep or not checkpoint:
            raise ValueError(f"not a checkpoint feature (<checkpoint>:<kind>): {value!r}")
        return cls(checkpoint, kind)  # type: ignore[arg-type]
