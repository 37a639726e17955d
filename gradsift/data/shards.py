"""One file's validated rows -> ``samples`` shard parts and one ``quarantine`` part, written as they fill.

Memory is bounded by a shard (``shard_size`` samples) and a quarantine batch, never by the file: a
shard is written the moment it is full, under the name ``shard_samples`` gives the whole file's samples
(dataset, index in file order, a hash of its sample ids), so the parts are the same as a whole-file ingest's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from gradsift.schemas.tables import QUARANTINE, SAMPLES
from gradsift.storage.keys import ShardKey
from gradsift.storage.store import Parts

QUARANTINE_BATCH_ROWS = 1000
"""Quarantine rows held before they are written out (a row group); fewer when their raw text passes this:"""
QUARANTINE_BATCH_CHARS = 4 << 20


@dataclass
class WrittenSource:
    """What ``write_source`` wrote: the shard names in file order, the counts and the labels of the samples."""

    dataset: str
    shards: list[str] = field(default_factory=list)
    shard_rows: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    quarantined: int = 0
    labels: set[str] = field(default_factory=set)


def write_source(
    items: Iterable[tuple[str, dict]], dataset: str, parts: Parts, shard_size: int, quarantine_part: str
) -> WrittenSource:
    """Write ``("sample", row)`` items into fixed-size shards (``samples/<shard>``) and ``("quarantine", row)``
    items into ``quarantine/<quarantine_part>`` (there, possibly empty, once every item is taken)."""
    out = WrittenSource(dataset)
    shard: list[dict] = []

    def flush_shard() -> None:
        name = ShardKey.of(dataset, len(out.shards), (s["sample_id"] for s in shard)).name
        parts.write_part("samples", name, pa.Table.from_pylist([{**s, "shard": name} for s in shard], schema=SAMPLES))
        out.shards.append(name)
        out.shard_rows[name] = len(shard)
        shard.clear()

    with parts.part_writer("quarantine", quarantine_part, QUARANTINE) as write_quarantine:
        held: list[dict] = []
        chars = 0
        for kind, row in items:
            if kind == "sample":
                shard.append(row)
                out.samples += 1
                if row["label"] is not None:
                    out.labels.add(row["label"])
                if len(shard) == shard_size:
                    flush_shard()
                continue
            held.append(row)
            out.quarantined += 1
            chars += len(row["raw"])
            if len(held) >= QUARANTINE_BATCH_ROWS or chars >= QUARANTINE_BATCH_CHARS:
                write_quarantine(pa.Table.from_pylist(held, schema=QUARANTINE))
                held, chars = [], 0
        if shard:
            flush_shard()
        if held:
            write_quarantine(pa.Table.from_pylist(held, schema=QUARANTINE))
    return out
