"""The pipeline stages: Prefect tasks with retries inside a flow run, plain calls outside one (``flows.runner``);
coarse units (DESIGN: keep Prefect tasks coarse, drive Ray directly inside them). Each stage is resumable
through its staging markers."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gradsift.data.ingest import IngestError, IngestResult, IngestStream, LabelRule
from gradsift.data.reasons import Problem, quarantine_row
from gradsift.data.shards import write_source
from gradsift.executors.ray import describe_executor, run_on_pool
from gradsift.executors.workers import ScoringWorker
from gradsift.flows.incremental import (
    ingest_key,
    known_parameter_set,
    record_ingest,
    reuse_ingest,
    scoring_key,
    unscored_shards,
)
from gradsift.flows.retry import retry_transient
from gradsift.flows.runner import in_flow_run, stage
from gradsift.flows.runs import file_digest, run_logger
from gradsift.models.adapter import TaskType, adapter
from gradsift.models.loading import head_of_folder, load_tokenizer
from gradsift.schemas.config import DataSource, IngestConfig, ModelConfig, NightlyConfig, RunConfig
from gradsift.schemas.stages import IngestOutput, ScoreOutput
from gradsift.storage.store import RunStaging, Store


def ingest_config(
    store: str, model: str, source: DataSource, classification: bool, labels: list[str] | None = None
) -> RunConfig:
    """The RunConfig that lets the ingest stage read one source for training (``labels`` None: the label set
    is the data's) or evaluation (``labels``: the trained classes; other rows are quarantined)."""
    task = "classification" if classification else "causal_lm"
    return RunConfig(
        store=store,
        model=ModelConfig(name_or_path=model, task=task, labels=labels, max_tokens=1_000_000),
        ingest=IngestConfig(sources=[source]),
    )


def label_rule(model: ModelConfig) -> tuple[TaskType, LabelRule]:
    """The task and label set of a run, fixed by its config (and model folder) before any row is read:
    ``model.labels``, else the integers 0..C-1 of ``num_labels`` or (task auto) of a classifier folder's head, else
    (``task = "classification"``: a proxy whose head is sized from the data) whatever labels the rows carry."""
    if model.task == "auto":
        task, classes = head_of_folder(model.name_or_path, model.num_labels)
    else:  # an explicit classification task sizes its head from num_labels or, without it, from the data
        task, classes = model.task, model.num_labels
    if task != "classification":
        return task, LabelRule()
    if model.labels is not None:
        return task, LabelRule(required=True, classes=tuple(model.labels))
    if classes is not None:
        return task, LabelRule(required=True, classes=tuple(str(i) for i in range(classes)))
    return task, LabelRule(required=True)


def _unreadable_file(source: DataSource, err: IngestError) -> IngestResult:
    """A skipped file as a result: no samples, one quarantine row at line 0 naming the file and the problem."""
    result = IngestResult(source.name)
    problem = Problem("unreadable_file", str(err).removeprefix(source.path + ": "))
    result.quarantine.append(quarantine_row(source.name, source.path, 0, problem, ""))
    return result


def _label_index(rule: LabelRule, found: set[str]) -> dict[str, int]:
    """Class index of each label: the rule's classes in order, else the labels found, sorted."""
    return {label: i for i, label in enumerate(rule.classes if rule.classes is not None else sorted(found))}


def ingest_sources(
    config: RunConfig, staging: RunStaging, logger: logging.Logger | logging.LoggerAdapter
) -> IngestOutput:
    """The ingest stage's work, without Prefect (``ingest_stage`` runs it with the run's logger): every source
    validated and streamed into fixed-size ``samples`` shards and a ``quarantine`` part in ``staging``, a shard
    at a time (data.shards). A source an earlier completed run ingested with the same file and settings is read
    back from the lake instead (flows.incremental). Starts from scratch: parts an interrupted attempt left are removed first.
    """
    tokenizer = load_tokenizer(config.model.name_or_path)
    task_type, labels = label_rule(config.model)
    counter = adapter(task_type)

    def n_tokens(prompt, response, text):
        return counter.count_tokens(tokenizer, prompt, response, text)

    def n_tokens_batch(rows):
        return counter.count_tokens_batch(tokenizer, rows)

    start = time.perf_counter()
    for table in ("samples", "quarantine", "ingests", "shard_members"):
        staging.clear(table)
    shards: list[str] = []
    found: set[str] = set()
    n_samples = n_quarantined = n_reused = 0
    for source in config.ingest.sources:
        key = ingest_key(config, source, file_digest(source.path))
        entry = reuse_ingest(staging.store, staging, key)
        if entry is None:
            quarantine_part = f"{source.name}-{hashlib.sha256(f'{source.path}:{key}'.encode()).hexdigest()[:12]}"
            try:
                stream = IngestStream(
                    source, n_tokens, config.model.max_tokens, labels, config.ingest.max_row_bytes, n_tokens_batch
                )
            except IngestError as err:
                if config.ingest.on_bad_file == "fail":
                    raise
                logger.warning("skipping %s (ingest.on_bad_file = 'skip'): %s", source.path, err)
                stream = [("quarantine", row) for row in _unreadable_file(source, err).quarantine]
            for note in getattr(stream, "notes", []):
                logger.info(note)
            written = write_source(stream, source.name, staging, config.ingest.shard_size, quarantine_part)
            entry = {
                "run_id": staging.run_id,
                "dataset": written.dataset,
                "shards": written.shards,
                "quarantine_part": quarantine_part,
                "samples": written.samples,
                "quarantined": written.quarantined,
                "labels": sorted(written.labels),
            }
            action = "ingested"
        else:
            n_reused += entry["samples"]
            action = f"unchanged since run {entry['run_id']}, reused"
        record_ingest(staging, key, entry)
        shards += entry["shards"]
        found.update(entry["labels"])
        n_samples += entry["samples"]
        n_quarantined += entry["quarantined"]
        logger.info("%s %s: %d samples, %d quarantined", action, source.path, entry["samples"], entry["quarantined"])
    info = IngestOutput(
        samples=n_samples,
        samples_reused=n_reused,
        quarantined=n_quarantined,
        seconds=round(time.perf_counter() - start, 2),
        shards=shards,
        task=task_type,
        label_index=_label_index(labels, found) if task_type == "classification" else None,
    )
    if config.ingest.sources and n_samples == 0:
        raise IngestError(
            f"no usable rows in {', '.join(s.path for s in config.ingest.sources)}: {n_quarantined} quarantined "
            "(see the reasons above, or in the quarantine table)"
        )
    return info


@stage("ingest", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def ingest_stage(config: RunConfig, staging: RunStaging) -> IngestOutput:
    """Validate and shard every source into the run's staging folder (``ingest_sources``); bad rows go to
    quarantine. Done once per run: a rerun after the stage finished returns its recorded output.
    """
    if (done := staging.stage_info("ingest")) is not None:
        done = IngestOutput.model_validate(done)
        run_logger().info("ingest already done for this run: %d samples, skipping", done.samples)
        return done
    info = ingest_sources(config, staging, run_logger())
    staging.mark_done("ingest", info.model_dump())
    return info


def _progress_artifact(n_done: int, n_shards: int, run_id: str) -> Callable[[int], None]:
    """Inside a flow run, a Prefect progress artifact of the scoring pass and the function that updates it;
    outside one (a direct run) the terminal's progress bar is all, and the function does nothing."""
    if not in_flow_run():
        return lambda done: None
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(
        progress=100.0 * n_done / max(n_shards, 1),
        description=f"scoring {n_shards} shards of run {run_id} ({n_done} reused or resumed)",
    )
    return lambda done: update_progress_artifact(artifact, progress=100.0 * done / n_shards)


@stage("score", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def score_stage(config: RunConfig, store: Store, run_id: str, ingest: IngestOutput) -> ScoreOutput:
    """Per-sample loss, gradient norm, layer stats and features for every shard, on Ray actors (in this process
    for a small input without a Ray cluster: ``executors.ray.in_process``).

    Shards whose samples the lake already has scores of under this run's scoring key (same model and score
    config) are not recomputed (flows.incremental); shards this run already scored before a crash are skipped.
    """
    logger = run_logger()
    staging = store.staging(run_id)
    if (done := staging.stage_info("score")) is not None:
        return ScoreOutput.model_validate(done)
    shards = ingest.shards
    key = scoring_key(config, ingest.label_index)
    staging.set_score_key(key)
    plan = unscored_shards(store, staging, shards, key)
    reused = set(plan.reused)
    todo = [s for s in shards if s not in reused and not staging.has_part("scores", s)]
    where = describe_executor(config.ray, len(todo)) if todo else "nothing to score"
    logger.info(
        "scoring %d of %d shards (%d reused from earlier runs, %d with %d samples scored already): %s",
        len(todo), len(shards), len(reused), len(plan.partial), plan.scored_before, where,
    )  # fmt: skip
    n_done_before = len(shards) - len(todo)
    progress = _progress_artifact(n_done_before, len(shards), run_id)
    with Progress(
        TextColumn("[bold]scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ) as bar:
        job = bar.add_task("score", total=len(shards), rate="")
        bar.update(job, completed=n_done_before)

        def on_done(info: dict, n_done: int, n_todo: int) -> None:
            bar.update(job, advance=1, rate=f"{info['rows'] / max(info['seconds'], 1e-9):.1f} samples/s")
            progress(n_done_before + n_done)

        start = time.perf_counter()
        # a nightly influence stage without checkpoints streams these features: their raw rows are written too
        streamed = isinstance(config, NightlyConfig) and config.target is not None and config.target.checkpoints is None
        worker = (str(store.root), run_id, config.model, config.score.engine, ingest.label_index, config.seed, streamed)
        scored = run_on_pool(ScoringWorker, worker, todo, config.ray, on_done, small_in_process=True)
        seconds = time.perf_counter() - start
    parameter_set = next((d["parameter_set"] for d in scored if d["parameter_set"]), None)
    parameter_set = parameter_set or known_parameter_set(store, key)
    info = ScoreOutput(
        shards_scored=len(scored),
        shards_resumed=n_done_before - len(reused),
        shards_reused=len(reused),
        rows=staging.count_rows("scores") + plan.scored_before,
        rows_scored=sum(d["rows"] for d in scored),
        seconds=round(seconds, 2),
        parameter_set=parameter_set,
    )
    logger.info("scored %d shards (%d already done) in %.1fs", len(scored), n_done_before, seconds)
    staging.mark_done("score", info.model_dump())
    return info
