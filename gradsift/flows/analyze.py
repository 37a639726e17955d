"""Gradient analyses of one file, as one committed run: preference-pair entanglement (``pair_scores``)
or fast vs slow thinking layer curves (``layer_curves``, ``layer_diffs``), then the report.

The Prefect task is the whole analysis (coarse, with retries); inside it Ray tasks each load the model
once and work through a chunk of pairs or one response variant, returning small tables.
"""

from __future__ import annotations

import json

import pyarrow as pa
import ray
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gradsift.data.pairs import (
    NoUsableRows,
    PairError,
    no_rows_message,
    parse_pair,
    quarantine_row,
    unreadable_reason,
)
from gradsift.data.readers import read_rows
from gradsift.executors.ray_pool import ensure_ray
from gradsift.flows.retry import retry_transient
from gradsift.flows.runs import RunRecorder, run_recorded
from gradsift.report.html import write_report
from gradsift.schemas.config import AnalyzeConfig, DataSource
from gradsift.schemas.engine import EngineConfig
from gradsift.schemas.tables import LAYER_CURVES, LAYER_DIFFS, PAIR_SCORES, QUARANTINE
from gradsift.storage.store import Store


def _engine(config: AnalyzeConfig, **overrides):
    from gradsift.engine.gradients import PerSampleGradients
    from gradsift.models.loading import load_model
    from gradsift.signals.scoring import pick_device

    model, tokenizer = load_model(config.model.name_or_path, seed=config.seed)
    model.to(pick_device())
    base = config.score.engine.model_dump() | {"parameters": "all", "layer_stats": True}
    return PerSampleGradients(model, EngineConfig(**(base | overrides))), tokenizer


@ray.remote
def _pairs_chunk(config: AnalyzeConfig, rows: list[tuple[int, str, str, str]]) -> tuple[pa.Table, list[dict]]:
    """pair_scores rows of ``rows`` (line, prompt, chosen, rejected), and quarantine rows of the pairs
    that have no response tokens."""
    from gradsift.signals.entanglement import encode_pair, pair_batch, pair_id

    pc = config.pairs
    dataset = pc.dataset or _stem(config.data)
    engine, tokenizer = _engine(config, loss_reduction="sum", micro_batch_size=config.score.engine.micro_batch_size)
    usable, bad = [], []
    for line, prompt, chosen, rejected in rows:
        try:
            encode_pair(tokenizer, prompt, chosen, rejected, config.model.max_tokens)
            usable.append((line, prompt, chosen, rejected))
        except ValueError as err:
            raw = json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False)
            bad.append(quarantine_row(dataset, config.data, line, f"empty text: {err}", raw))
    out = []
    step = max(1, engine.config.micro_batch_size // 2)
    for i in range(0, len(usable), step):
        chunk = usable[i : i + step]
        res = pair_batch(engine, tokenizer, [r[1:] for r in chunk], config.model.max_tokens, pc.exact)
        for j, (line, prompt, chosen, rejected) in enumerate(chunk):
            row = {"dataset": dataset, "pair_id": pair_id(prompt, chosen, rejected), "line": line}
            values = {k: float(v[j]) for k, v in res.items() if k != "truncated"}
            out.append(row | values | {"truncated": bool(res["truncated"][j])})
    return pa.Table.from_pylist(out, schema=PAIR_SCORES), bad


@ray.remote
def _variant_curve(config: AnalyzeConfig, pairs: list[tuple[str, str]]) -> dict:
    from gradsift.signals.layer_curves import nuclear_curves

    engine, tokenizer = _engine(config, nuclear_modules=config.fast_slow.modules, feature_dim=0)
    return nuclear_curves(engine, tokenizer, pairs, config.model.max_tokens)


def _stem(path: str) -> str:
    from pathlib import Path

    return Path(path).name.split(".")[0]


def gsm8k_rows(config: AnalyzeConfig) -> tuple[list[tuple[str, str]], list[dict]]:
    """(question, answer) of the first ``fast_slow.limit`` usable problems, and a quarantine row for every
    other row read (not an object, a missing or non-string field, an empty text)."""
    fs = config.fast_slow
    dataset = fs.dataset or _stem(config.data)
    good, bad = [], []
    for row in read_rows(DataSource(path=config.data)):
        if fs.limit and len(good) >= fs.limit:
            break
        reason = unreadable_reason(row) if row.record is None else _gsm8k_problem(row.record, fs.question, fs.answer)
        if reason:
            bad.append(quarantine_row(dataset, config.data, row.line, reason, row.raw))
        else:
            good.append((row.record[fs.question], row.record[fs.answer]))
    return good, bad


def _gsm8k_problem(record: dict, question: str, answer: str) -> str | None:
    for name in (question, answer):
        value = record.get(name)
        if value is None:
            return f"missing field: {name!r} (fields in this row: {', '.join(sorted(record)) or 'none'})"
        if not isinstance(value, str):
            return f"wrong type: field {name!r} is {type(value).__name__}, expected a string"
        if not value.strip():
            return f"empty text: field {name!r} is empty"
    return None


def pair_rows(config: AnalyzeConfig) -> tuple[list[tuple[int, str, str, str]], list[dict]]:
    """(line, prompt, chosen, rejected) of every usable pair in ``config.data`` (the first ``pairs.limit``),
    and a quarantine row for every other row read (tasks.pairs: layouts and reasons)."""
    pc = config.pairs
    dataset = pc.dataset or _stem(config.data)
    good, bad = [], []
    for row in read_rows(DataSource(path=config.data)):
        if pc.limit and len(good) >= pc.limit:
            break
        try:
            if row.record is None:
                raise PairError(unreadable_reason(row))
            good.append((row.line, *parse_pair(row.record, pc)))
        except PairError as err:
            bad.append(quarantine_row(dataset, config.data, row.line, str(err), row.raw))
    return good, bad


def usable_pairs(config: AnalyzeConfig) -> tuple[list[tuple[int, str, str, str]], list[dict]]:
    """``pair_rows``, or ``NoUsableRows`` naming the file and the commonest reasons when none is usable
    (the CLI calls it before the flow, so that such a file fails with a message, not a traceback)."""
    good, bad = pair_rows(config)
    if not good:
        raise NoUsableRows(no_rows_message(config.data, bad))
    return good, bad


TRUNCATION = "prompt end and response start kept"


@task(name="pairs", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def pairs_stage(config: AnalyzeConfig, store: Store, run_id: str) -> dict:
    """Entanglement of every usable pair, chunks fanned out as Ray tasks; every other row is quarantined."""
    logger = get_run_logger()
    staging = store.staging(run_id)
    rows, quarantine = usable_pairs(config)
    n_chunks = max(1, min(len(rows), 4 * config.ray.num_actors))
    size = -(-len(rows) // n_chunks)
    refs = [_pairs_chunk.remote(config, rows[i : i + size]) for i in range(0, len(rows), size)]
    n_pairs = n_cut = 0
    for k, (table, bad) in enumerate(ray.get(refs)):
        staging.write_part("pair_scores", f"chunk-{k:05d}", table)
        quarantine += bad
        n_pairs += table.num_rows
        n_cut += sum(table.column("truncated").to_pylist())
    quarantine.sort(key=lambda q: q["line"])
    dataset = config.pairs.dataset or _stem(config.data)
    staging.write_part("quarantine", dataset, pa.Table.from_pylist(quarantine, schema=QUARANTINE))
    if not n_pairs:
        raise NoUsableRows(no_rows_message(config.data, quarantine))
    max_tokens = config.model.max_tokens
    logger.info("entanglement of %d pairs; %d rows quarantined (see the quarantine table)", n_pairs, len(quarantine))
    logger.info("%d of %d pairs truncated to %d tokens (%s)", n_cut, n_pairs, max_tokens, TRUNCATION)
    return {"rows": n_pairs, "quarantined": len(quarantine), "truncated": n_cut, "max_tokens": max_tokens}


@task(name="fast-slow", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def fast_slow_stage(config: AnalyzeConfig, store: Store, run_id: str) -> dict:
    """Nuclear-norm layer curves per variant (one Ray task each) and their early/middle/late differences."""
    from gradsift.signals.layer_curves import gsm8k_variants, third_diffs

    fs = config.fast_slow
    problems, quarantine = gsm8k_rows(config)
    if not problems:
        hint = "Map the fields with fast_slow.question and fast_slow.answer"
        raise NoUsableRows(no_rows_message(config.data, quarantine, "gsm8k problem", hint))
    variants: dict[str, list[tuple[str, str]]] = {}
    for question, answer in problems:
        for name, pair in gsm8k_variants(question, answer).items():
            variants.setdefault(name, []).append(pair)
    names = sorted(variants)
    curves = dict(zip(names, ray.get([_variant_curve.remote(config, variants[n]) for n in names]), strict=True))
    dataset = fs.dataset or _stem(config.data)
    rows = [
        {"dataset": dataset, "variant": v, "layer": layer, "module": module}
        | {"nuclear_norm": c["nuclear_norm"], "grad_norm": c["grad_norm"], "n_samples": c["n"]}
        for v in names
        for (layer, module), c in sorted(curves[v].items())
    ]
    staging = store.staging(run_id)
    staging.write_part("quarantine", dataset, pa.Table.from_pylist(quarantine, schema=QUARANTINE))
    staging.write_part("layer_curves", dataset, pa.Table.from_pylist(rows, schema=LAYER_CURVES))
    diffs = [
        {"dataset": dataset, "variant_a": "fast", "variant_b": "slow"} | d
        for d in third_diffs(curves["fast"], curves["slow"])
    ]
    staging.write_part("layer_diffs", dataset, pa.Table.from_pylist(diffs, schema=LAYER_DIFFS))
    return {"rows": len(rows), "diffs": diffs, "quarantined": len(quarantine)}


@flow(name="gradsift-analyze", log_prints=True)
def analyze_flow(config: AnalyzeConfig) -> dict:
    """Run one analysis (``config.pairs`` or ``config.fast_slow``) on ``config.data`` as a committed run."""
    kind = "pairs" if config.pairs is not None else "fast_slow"

    def body(recorder: RunRecorder) -> dict:
        ensure_ray(config.ray)
        result = (pairs_stage if kind == "pairs" else fast_slow_stage)(config, recorder.store, recorder.run_id)
        staging = recorder.staging
        tables = {t: staging.read(t) for t in ("pair_scores", "layer_curves")}
        summaries = {"Layer differences": staging.read("layer_diffs")} if kind == "fast_slow" else {}
        out, final = staging.artifact_dir("reports"), staging.final_artifact_path("reports")
        page, _ = write_report(out, recorder.run_id, tables, summaries, final)
        return {kind: result, "report": str(page)}

    model = config.model
    sources = [DataSource(path=config.data)]
    return run_recorded(f"analyze-{kind}", config, sources, model.name_or_path, body, model.checkpoint)
