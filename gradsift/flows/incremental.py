"""Incremental runs: reuse what the lake already holds under the same keys ("same key: no new rows").

Two keys decide what a new run may take from earlier ones:

- the *ingest key* of a source: its file's content hash, its field mapping, the shard size and the
  tokenizer and length limit that decide quarantine. Same key: the shards an earlier run made of it are read back
  from the lake (``ingests`` names them) into this run's staging, and the file is not read again.
- the *scoring key* of a run: model (name, weights fingerprint, checkpoint, dtype, labels), score config, seed and
  code version, stored in the ``score_key`` column of ``scores``, ``layer_stats`` and ``features``. A shard whose
  every sample already has a ``scores`` row under the run's key is not scored again; the others are scored and
  their rows written once (the lake skips keys it has). Changing the model or the score config changes the key.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import gradsift
from gradsift.models.folders import model_fingerprint
from gradsift.schemas.config import DataSource, RunConfig
from gradsift.schemas.tables import QUARANTINE, SAMPLES
from gradsift.storage.lake import INGESTS
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
    back from the lake; its ingest entry, or None (then the source is ingested again: no such run, or the lake holds
    its shards' samples under other shard names, e.g. samples first ingested from an earlier version of the file)."""
    found = store.read("SELECT entry FROM ingests_history WHERE ingest_key = ? LIMIT 1", [key]).to_pylist()
    if not found:
        return None
    entry = json.loads(found[0]["entry"])
    cols = ", ".join(SAMPLES.names)
    samples = store.read(f"SELECT {cols} FROM samples WHERE list_contains(?, shard)", [entry["shards"]])
    if samples.num_rows != entry["samples"]:
        return None
    samples = samples.cast(SAMPLES)
    for shard in entry["shards"]:
        rows = samples.filter(pc.equal(samples["shard"], shard)).sort_by([("line", "ascending")])
        staging.write_part("samples", shard, rows)
    cols = ", ".join(QUARANTINE.names)
    quarantine = store.read(
        f"SELECT {cols} FROM quarantine_history WHERE run_id = ? AND dataset = ? ORDER BY line",
        [entry["run_id"], entry["dataset"]],
    )
    staging.write_part("quarantine", entry["quarantine_part"], quarantine.cast(QUARANTINE))
    return entry


def record_ingest(staging: RunStaging, key: str, entry: dict) -> None:
    """Record in this run which shards a source's ingest made (``entry``: run_id of the run that read the file,
    dataset, shards, quarantine_part, counts, labels); committed with the run as its ``ingests`` row."""
    row = {"ingest_key": key, "dataset": entry["dataset"], "entry": json.dumps(entry)}
    staging.write_part("ingests", entry["quarantine_part"], pa.Table.from_pylist([row], schema=INGESTS))


def reused_shards(store: Store, staging: RunStaging, shards: list[str], key: str) -> list[str]:
    """The staged shards whose every sample already has a ``scores`` row under ``key`` in the lake."""
    if not shards:
        return []
    columns = ["dataset", "sample_id", "shard"]
    ids = pa.concat_tables([pq.read_table(staging.part_path("samples", s), columns=columns) for s in shards])
    with store.reader() as con:
        con.register("_run_samples", ids)
        missing = dict(
            con.execute(
                "SELECT shard, count(*) FILTER (WHERE c.sample_id IS NULL) FROM _run_samples s LEFT JOIN "
                "(SELECT DISTINCT dataset, sample_id FROM scores WHERE score_key = ?) c USING (dataset, sample_id) "
                "GROUP BY shard",
                [key],
            ).fetchall()
        )
    return [s for s in shards if missing.get(s, 1) == 0]


def known_parameter_set(store: Store, key: str) -> dict | None:
    """The parameter set recorded by a run whose scores are stored under ``key`` (a run that reused every shard
    loaded no model)."""
    found = store.read(
        "SELECT parameter_set FROM runs WHERE parameter_set IS NOT NULL AND run_id IN "
        "(SELECT DISTINCT run_id FROM scores WHERE score_key = ?) LIMIT 1",
        [key],
    ).to_pylist()
    return json.loads(found[0]["parameter_set"]) if found else None
