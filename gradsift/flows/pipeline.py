"""The run pipeline every flow shares: start the run, run stages, commit it to the lake."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gradsift.flows.runner import in_flow_run
from gradsift.flows.runs import RunRecorder, run_recorded
from gradsift.flows.stages import ingest_stage, score_stage
from gradsift.schemas.config import RunConfig
from gradsift.schemas.stages import StageOutput
from gradsift.storage.store import Store

# What a downstream stage is called with: (config, store, run_id, results of the stages it needs).
StageFn = Callable[[RunConfig, Store, str, Mapping[str, StageOutput]], StageOutput]


@dataclass(frozen=True)
class Stage:
    """A downstream stage: its Prefect task and the earlier stages whose results it reads."""

    name: str
    run: StageFn
    needs: tuple[str, ...] = ("ingest",)


def check_order(stages: list[Stage], score: bool) -> None:
    """Every stage comes after the stages it needs (the order of a list is then the statement of it)."""
    done = {"ingest", "score"} if score else {"ingest"}
    for stage in stages:
        if missing := [n for n in stage.needs if n not in done]:
            raise ValueError(f"stage {stage.name!r} needs {missing}, which do not run before it")
        done.add(stage.name)


def run_pipeline(flow: str, config: RunConfig, extra_stages: list[Stage] = (), score: bool = True) -> dict:
    """ingest -> score (unless ``score`` is false) -> extra stages, in one run written to staging and committed
    whole. Returns the run's record with each stage's result as a dict."""
    check_order(list(extra_stages), score)

    def body(recorder: RunRecorder) -> dict:
        results: dict[str, StageOutput] = {"ingest": ingest_stage(config, recorder.staging)}
        if score:
            results["score"] = score_stage(config, recorder.store, recorder.run_id, results["ingest"])
        seconds = {}
        for stage in extra_stages:
            start = time.perf_counter()
            needed = {name: results[name] for name in stage.needs}
            results[stage.name] = stage.run(config, recorder.store, recorder.run_id, needed)
            seconds[stage.name] = round(time.perf_counter() - start, 2)
        out = {name: result.model_dump() for name, result in results.items()}
        parameter_set = out.get("score", {}).get("parameter_set")
        return {"run_id": recorder.run_id, "store": str(recorder.store.root), **out, "seconds": seconds,
                "parameter_set": parameter_set}  # fmt: skip

    model = config.model
    results = run_recorded(flow, config, config.ingest.sources, model.name_or_path, body, model.checkpoint)
    if results["status"] == "completed" and in_flow_run():  # a direct run has no Prefect UI to publish to
        _publish(results)
    return results


def _publish(results: dict) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

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
        rows = results[name].get("rows")
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
