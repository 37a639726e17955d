"""Incremental runs: reuse committed results whose inputs and setup are unchanged.

Two keys decide what a new run may take from earlier ones:

- the *ingest key* of a source: its file's content hash, its field mapping, the shard size and the
  tokenizer and length limit that decide quarantine. Same key: the earlier run's ``samples`` and
  ``quarantine`` parts are reused and the file is not read again.
- the *scoring key* of a run: model (name, weights fingerprint, checkpoint, dtype, labels), score config, seed and code
  version. A shard's name is a hash of its sample ids, so a shard of the same name scored under
  the same key has the same scores: its ``scores``, ``layer_stats`` and ``features`` parts are
  reused. Changing the model or the score config changes the key and invalidates exactly those.

Reuse hard-links (or copies, across filesystems) committed parts into the new run's staging folder,
so the new run is complete on its own and committed like any other. The index of keys lives in
``<store>/index/``; an entry counts only when its run completed and its parts are in ``tables/``, whole: each
part is checked before it is linked (its footer reads and it holds the rows the entry recorded), and a broken
one is not reused but recomputed, with a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gradsift
from gradsift.flows.runs import run_logger
from gradsift.models.folders import model_fingerprint
from gradsift.schemas.config import DataSource, RunConfig
from gradsift.schemas.tables import SCORE_TABLES
from gradsift.storage.atomic import link_atomic, write_json_atomic
from gradsift.storage.check import part_problem
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


def _index_path(store: Store, kind: str, name: str) -> Path:
    return store.root / "index" / kind / f"{name}.json"


def _completed(store: Store, run_id: str) -> bool:
    row = store.read_run(run_id)
    return bool(row) and row["status"] == "completed"


def _committed_part(store: Store, run_id: str, table: str, part: str) -> Path:
    return store.tables / table / f"run_id={run_id}" / f"{part}.parquet"


def _whole(store: Store, entry: dict, table: str, part: str) -> bool:
    """The committed part an index entry names is there, reads, and holds the rows the entry recorded for it
    (entries written before row counts were recorded: it reads). A broken one is named in a warning."""
    path = _committed_part(store, entry["run_id"], table, part)
    if not path.exists():
        return False
    problem = part_problem(path, entry.get("rows", {}).get(table, {}).get(part))
    if problem is not None:
        run_logger().warning(
            "not reusing %s of run %s: %s; it is recomputed (`gradsift store check` lists every broken part)",
            path,
            entry["run_id"],
            problem,
        )
    return problem is None


def _link_part(store: Store, prior_run: str, table: str, part: str, staging: RunStaging) -> bool:
    src = _committed_part(store, prior_run, table, part)
    if not src.exists():
        return False
    link_atomic(src, staging.part_path(table, part))
    return True


def reuse_ingest(store: Store, staging: RunStaging, key: str) -> dict | None:
    """Link an earlier run's samples and quarantine parts of this source; its ingest entry, or None (then the
    source is ingested again: no such run, or one of its parts is missing or broken)."""
    path = _index_path(store, "ingest", key)
    if not path.exists():
        return None
    entry = json.loads(path.read_text())
    prior = entry["run_id"]
    if prior == staging.run_id or not _completed(store, prior):
        return None
    parts = [("samples", shard) for shard in entry["shards"]] + [("quarantine", entry["quarantine_part"])]
    if not all(_whole(store, entry, t, p) for t, p in parts):
        return None
    for table, part in parts:
        _link_part(store, prior, table, part, staging)
    return entry


def record_ingest(store: Store, key: str, entry: dict) -> None:
    """Remember which run ingested a source (``entry``: run_id, dataset, shards, quarantine_part, counts, labels,
    and ``rows`` {table: {part: rows}}, which reuse checks each part against)."""
    write_json_atomic(entry, _index_path(store, "ingest", key))


def reuse_scores(store: Store, staging: RunStaging, shards: list[str], key: str) -> list[str]:
    """Link score parts of shards an earlier completed run scored under ``key``; returns those shards.

    A shard whose parts in that run are broken is taken from another such run, or else scored again."""
    priors = []
    for path in sorted(
        (store.root / "index" / "scoring").glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True
    ):
        entry = json.loads(path.read_text())
        if entry["key"] == key and entry["run_id"] != staging.run_id and _completed(store, entry["run_id"]):
            priors.append((entry, set(entry["shards"])))
    reused = []
    for shard in shards:
        if staging.has_part("scores", shard):
            continue
        for entry, done in priors:
            if shard not in done or not _committed_part(store, entry["run_id"], "scores", shard).exists():
                continue
            present = [t for t in SCORE_TABLES if _committed_part(store, entry["run_id"], t, shard).exists()]
            if all(_whole(store, entry, table, shard) for table in present):  # features absent: none computed
                for table in present:
                    _link_part(store, entry["run_id"], table, shard, staging)
                reused.append(shard)
                break
    return reused


def record_scores(store: Store, run_id: str, key: str, shards: list[str], parameter_set: dict | None) -> None:
    """Remember that ``run_id`` scored ``shards`` under ``key`` (used once the run has completed), with the rows
    of each of its staged score parts (reuse checks each part against them)."""
    staging = store.staging(run_id)
    rows = {
        table: {shard: staging.count_rows(table, shard) for shard in shards if staging.has_part(table, shard)}
        for table in SCORE_TABLES
    }
    entry = {"run_id": run_id, "key": key, "shards": shards, "parameter_set": parameter_set, "rows": rows}
    write_json_atomic(entry, _index_path(store, "scoring", run_id))


def known_parameter_set(store: Store, key: str) -> dict | None:
    """The parameter set recorded for ``key`` by any run (a run that reused every shard loaded no model)."""
    for path in (store.root / "index" / "scoring").glob("*.json"):
        entry = json.loads(path.read_text())
        if entry["key"] == key and entry.get("parameter_set"):
            return entry["parameter_set"]
    return None
