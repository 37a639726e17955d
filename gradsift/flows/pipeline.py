"""The run pipeline every flow shares: start the run, run stages, commit, refresh the catalog."""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gradsift.flows.runs import RunRecorder, run_recorded
from gradsift.flows.stages import ingest_stage, score_stage
from gradsift.schemas.config import RunConfig
from gradsift.storage.store import Store

# An extra stage: (config, store, run_id, results so far) -> its own result dict.
Stage = Callable[[RunConfig, Store, str, dict], dict]


def run_pipeline(
    flow: str, config: RunConfig, extra_stages: dict[str, Stage] | None = None, score: bool = True
) -> dict:
    """ingest -> score (unless ``score`` is false) -> extra stages, in one run written to staging and committed whole."""

    def body(recorder: RunRecorder) -> dict:
        results: dict = {"run_id": recorder.run_id, "store": str(recorder.store.root)}
        results["ingest"] = ingest_stage(config, recorder.staging)
        if score:
            results["score"] = score_stage(config, recorder.store, recorder.run_id, results["ingest"])
        for name, stage in (extra_stages or {}).items():
            start = time.perf_counter()
            results[name] = stage(config, recorder.store, recorder.run_id, results)
            results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
        results["parameter_set"] = results.get("score", {}).get("parameter_set")
        return results

    model = config.model
    results = run_recorded(flow, config, config.ingest.sources, model.name_or_path, body, model.checkpoint)
    if results["status"] == "completed":
        _publish(results)
    return results


def _publish(results: dict) -> None:
    ingest, score = results["ingest"], results.get("score")
    if score is None:  # a flow without a scoring pass (influence on checkpoints): its report stage publishes
        return
    counts = [
        {
            "stage": "ingest",
            "rows": ingest["samples"],
            "reused": ingest.get("samples_reused", 0),
            "quarantined": ingest["quarantined"],
            "seconds": ingest.get("seconds"),
        },
        {
            "stage": "score",
            "rows": score["rows"],
            "reused": score["rows"] - score.get("rows_scored", score["rows"]),
            "quarantined": 0,
            "seconds": score["seconds"],
        },
    ]
    for name, seconds in results.get("seconds", {}).items():
        rows = results[name].get("rows") if isinstance(results[name], dict) else None
        counts.append({"stage": name, "rows": rows, "reused": None, "quarantined": None, "seconds": seconds})
    create_table_artifact(counts, key="stage-counts", description=f"rows per stage, run {results['run_id']}")
    create_markdown_artifact(
        f"# gradsift run `{results['run_id']}`\n\n"
        f"- samples ingested: {ingest['samples']}, quarantined: {ingest['quarantined']}\n"
        f"- shards scored: {score['shards_scored']} (resumed: {score['shards_resumed']}, "
        f"reused from earlier runs: {score.get('shards_reused', 0)})\n"
        f"- store: `{results['store']}`\n\n"
        'Reproduce each figure with `gradsift query --store STORE "SQL"`:\n\n'
        "```sql\n"
        f"-- samples ingested\nSELECT count(*) FROM samples WHERE ingest_run_id = '{results['run_id']}';\n"
        f"-- quarantined\nSELECT reason, count(*) FROM quarantine WHERE run_id = '{results['run_id']}' GROUP BY reason;\n"
        f"-- rows scored\nSELECT count(*) FROM scores WHERE run_id = '{results['run_id']}';\n"
        "-- loss and gradient norm per domain\nSELECT domain, count(*), avg(loss), avg(grad_norm) FROM scores "
        f"JOIN samples USING (dataset, sample_id) WHERE run_id = '{results['run_id']}' GROUP BY domain;\n```\n",
        key="run-report",
    )
