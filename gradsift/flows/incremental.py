"""Incremental runs: reuse what the lake already holds under the same keys ("same key: no new rows").

Two keys decide what a new run may take from earlier ones:

- the *ingest key* of a source: its file's content hash, its field mapping, the shard size and the
  tokenizer and length limit that decide quarantine. Same key: the shards an earlier run made of it (``ingests``
  names them) are read back from the lake into this run's staging by ``(dataset, sample_id)`` through
  ``shard_members``, wherever each sample was first stored, and the file is not read again.
- the *scoring key* of a run: model (name, weights fingerprint, checkpoint, dtype, labels), score config, seed and
  code version, stored in the ``score_key`` column of ``scores``, ``layer_stats`` and ``features``. A sample that
  already has a ``scores`` row under the run's key is not scored again, whatever shard it now sits in; the others
  are scored and their rows written once (the lake skips keys it has). Changing the model or the score config
  changes the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import gradsift
from gradsift.executors.workers import UNSCORED
from gradsift.models.folders import model_fingerprint
from gradsift.schemas.config import DataSource, RunConfig
from gradsift.schemas.tables import QUARANTINE, SAMPLES
from gradsift.storage.lake import INGESTS, SHARD_MEMBERS
from gradsift.storage.lake_query import shard_samples_sql
from gradsift.storage.store import RunStaging, Store


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ingest_key(config: RunConfig, source: DataSource, file_hash: str) -> str:
    model = config.model
    return _digest(
        {
            "source": source.model_dump(mode="json", exclude={"path"}),
            "file": file_hash,
            "shard_size": config.ingest.shard_size,
            "tokenizer": model.name_or_path,
            "max_tokens": model.max_tokens,
            "max_row_bytes": config.ingest.max_row_bytes,
            "task": model.task,
            "num_labels": model.num_labels,
            "labels": model.labels,
            "code": gradsift.__version__,
        }
    )


def scoring_key(config: RunConfig, label_index: dict[str, int] | None) -> str:
    return _digest(
        {
            "model": config.model.model_dump(mode="json", exclude={"max_tokens"}),
            "weights": model_fingerprint(config.model.name_or_path),
            "score": config.score.model_dump(mode="json"),
            "seed": config.seed,
            "labels": label_index,
            "code": gradsift.__version__,
        }
    )


def reuse_ingest(store: Store, staging: RunStaging, key: str) -> dict | None:
    """Stage the samples and quarantine rows an earlier completed run made of this source (same ingest key), read
    back from the lake by ``(dataset, sample_id)`` through ``shard_members`` (wherever each sample was first
    stored); its ingest entry, or None (no such run: the source is ingested again)."""
    found = store.read("SELECT entry FROM ingests_history WHERE ingest_key = ? LIMIT 1", [key]).to_pylist()
    if not found:
        return None
    entry = json.loads(found[0]["entry"])
    samples = store.read(shard_samples_sql("$shards"), {"shards": entry["shards"]})
    if samples.num_rows != entry["samples"]:
        return None
    samples = samples.select(SAMPLES.names).cast(SAMPLES)
    for shard in entry["shards"]:
        staging.write_part("samples", shard, samples.filter(pc.equal(samples["shard"], shard)))
    cols = ", ".join(QUARANTINE.names)
    quarantine = store.read(
        f"SELECT {cols} FROM quarantine_history WHERE run_id = ? AND dataset = ? ORDER BY line",
        [entry["run_id"], entry["dataset"]],
    )
    staging.write_part("quarantine", entry["quarantine_part"], quarantine.cast(QUARANTINE))
    return entry


def record_ingest(staging: RunStaging, key: str, entry: dict) -> None:
    """Record in this run which shards a source's ingest made (``entry``: run_id of the run that read the file,
    dataset, shards, quarantine_part, counts, labels); committed with the run as its ``ingests`` row. When this
    run read the file, also which samples each of its shards holds (``shard_members``, stored once per shard)."""
    row = {"ingest_key": key, "dataset": entry["dataset"], "entry": json.dumps(entry)}
    staging.write_part("ingests", entry["quarantine_part"], pa.Table.from_pylist([row], schema=INGESTS))
    if entry["run_id"] != staging.run_id:
        return
    for shard in entry["shards"]:  # a part per shard, like samples: the commit inserts them a batch of files at a time
        ids = pq.read_table(staging.part_path("samples", shard), columns=["dataset", "sample_id"])
        n = ids.num_rows
        members = ids.append_column("shard", pa.array([shard] * n)).append_column("position", pa.array(range(n)))
        staging.write_part("shard_members", shard, members.select(SHARD_MEMBERS.names).cast(SHARD_MEMBERS))


@dataclass(frozen=True)
class ScoringPlan:
    """What the score stage scores of a run's staged shards, by ``(dataset, sample_id)`` under the scoring key."""

    reused: list[str]
    """Shards whose every sample already has a ``scores`` row under the key: not scored."""
    partial: list[str]
    """Shards with some samples scored: their other samples are written to ``executors.workers.UNSCORED``, the
    part the scoring worker reads instead of the whole shard."""
    scored_before: int
    """Samples of the shards that the lake has scores of already."""


def unscored_shards(store: Store, staging: RunStaging, shards: list[str], key: str) -> ScoringPlan:
    """Plan the scoring of the staged ``shards``: a sample the lake has a ``scores`` row of under ``key`` is not
    scored again, whatever shard it came in (a file rewritten with old and new rows scores the new ones only)."""
    if not shards:
        return ScoringPlan([], [], 0)
    columns = ["dataset", "sample_id", "shard"]
    ids = pa.concat_tables([pq.read_table(staging.part_path("samples", s), columns=columns) for s in shards])
    with store.reader() as con:
        con.register("_run_samples", ids)
        todo = con.execute(
            "SELECT shard, list(sample_id) AS ids FROM _run_samples ANTI JOIN "
            "(SELECT DISTINCT dataset, sample_id FROM scores WHERE score_key = ?) USING (dataset, sample_id) "
            "GROUP BY shard",
            [key],
        ).to_arrow_table()
    unscored = dict(zip(todo["shard"].to_pylist(), todo["ids"].to_pylist(), strict=True))
    reused, partial, before = [], [], 0
    for shard in shards:
        n, left = staging.count_rows("samples", shard), unscored.get(shard, [])
        before += n - len(left)
        if not left:
            reused.append(shard)
        elif len(left) < n:
            rows = pq.read_table(staging.part_path("samples", shard))
            staging.scratch.write_part(UNSCORED, shard, rows.filter(pc.is_in(rows["sample_id"], pa.array(left))))
            partial.append(shard)
    return ScoringPlan(reused, partial, before)


def known_parameter_set(store: Store, key: str) -> dict | None:
    """The parameter set recorded by a run whose scores are stored under ``key`` (a run that reused every shard
    loaded no model)."""
    found = store.read(
        "SELECT parameter_set FROM runs WHERE parameter_set IS NOT NULL AND run_id IN "
        "(SELECT DISTINCT run_id FROM scores WHERE score_key = ?) LIMIT 1",
        [key],
    ).to_pylist()
    return json.loads(found[0]["parameter_set"]) if found else None
