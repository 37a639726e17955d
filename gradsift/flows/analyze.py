"""Gradient analyses of one file, as one committed run: preference-pair entanglement (``pair_scores``)
or fast vs slow thinking layer curves (``layer_curves``, ``layer_diffs``), then the report.

The Prefect task is the whole analysis (coarse, with retries); inside it a pool of Ray actors, each loading
the model once, works through chunks of pairs (writing their parts) or the response variants.
"""

from __future__ import annotations

import pyarrow as pa

from gradsift.data.pairs import BadRecord, NoUsableRows, no_rows_message, parse_pair
from gradsift.data.readers import read_rows
from gradsift.data.reasons import quarantine_row, text_field
from gradsift.executors.ray import run_on_pool
from gradsift.executors.workers import PairEntanglement, VariantCurves
from gradsift.flows.retry import retry_transient
from gradsift.flows.runner import flow_or_direct, lazy_flows, stage
from gradsift.flows.runs import RunRecorder, run_logger, run_recorded
from gradsift.report.html import write_report
from gradsift.schemas.config import AnalyzeConfig, DataSource
from gradsift.schemas.tables import LAYER_CURVES, LAYER_DIFFS, QUARANTINE
from gradsift.storage.store import Store


def _stem(path: str) -> str:
    from pathlib import Path

    return Path(path).name.split(".")[0]


def usable_rows(config: AnalyzeConfig, section, parse) -> tuple[list[tuple], list[dict]]:
    """``(line, *parse(record))`` of the first ``section.limit`` usable records of ``config.data``, and a quarantine
    row for every other row read: ``parse`` raises ``BadRecord`` with the category and detail of a bad one."""
    dataset = section.dataset or _stem(config.data)
    good, bad = [], []
    for row in read_rows(DataSource(path=config.data)):
        if section.limit and len(good) >= section.limit:
            break
        if row.record is None:
            bad.append(quarantine_row(dataset, config.data, row.line, row.problem, row.raw))
            continue
        try:
            good.append((row.line, *parse(row.record)))
        except BadRecord as err:
            bad.append(quarantine_row(dataset, config.data, row.line, err.problem, row.raw))
    return good, bad


def gsm8k_problem(record: dict, question: str, answer: str) -> tuple[str, str]:
    """(question, answer) of a gsm8k-style record; ``BadRecord`` says what is wrong with a bad one."""
    return (
        text_field(record, question, error=BadRecord),
        text_field(record, answer, error=BadRecord),
    )


def pair_rows(config: AnalyzeConfig) -> tuple[list[tuple[int, str, str, str]], list[dict]]:
    """(line, prompt, chosen, rejected) of every usable pair in ``config.data`` (the first ``pairs.limit``),
    and a quarantine row for every other row read (data.pairs: layouts and reasons)."""
    return usable_rows(config, config.pairs, lambda record: parse_pair(record, config.pairs))


def usable_pairs(config: AnalyzeConfig) -> tuple[list[tuple[int, str, str, str]], list[dict]]:
    """``pair_rows``, or ``NoUsableRows`` naming the file and the commonest reasons when none is usable
    (the CLI calls it before the flow, so that such a file fails with a message, not a traceback)."""
    good, bad = pair_rows(config)
    if not good:
        raise NoUsableRows(no_rows_message(config.data, bad))
    return good, bad


TRUNCATION = "prompt end and response start kept"


@stage("pairs", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def pairs_stage(config: AnalyzeConfig, store: Store, run_id: str) -> dict:
    """Entanglement of every usable pair, in chunks on the Ray pool; every other row is quarantined."""
    logger = run_logger()
    staging = store.staging(run_id)
    rows, quarantine = usable_pairs(config)
    dataset = config.pairs.dataset or _stem(config.data)
    n_chunks = max(1, min(len(rows), 4 * config.ray.num_actors))
    size = -(-len(rows) // n_chunks)
    chunks = list(enumerate(rows[i : i + size] for i in range(0, len(rows), size)))
    done = run_on_pool(PairEntanglement, (config, dataset, str(store.root), run_id), chunks, config.ray)
    n_pairs, n_cut = sum(d["rows"] for d in done), sum(d["truncated"] for d in done)
    quarantine = sorted(quarantine + [q for d in done for q in d["bad"]], key=lambda q: q["line"])
    staging.write_part("quarantine", dataset, pa.Table.from_pylist(quarantine, schema=QUARANTINE))
    if not n_pairs:
        raise NoUsableRows(no_rows_message(config.data, quarantine))
    max_tokens = config.model.max_tokens
    logger.info("entanglement of %d pairs; %d rows quarantined (see the quarantine table)", n_pairs, len(quarantine))
    logger.info("%d of %d pairs truncated to %d tokens (%s)", n_cut, n_pairs, max_tokens, TRUNCATION)
    return {"rows": n_pairs, "quarantined": len(quarantine), "truncated": n_cut, "max_tokens": max_tokens}


@stage("fast-slow", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def fast_slow_stage(config: AnalyzeConfig, store: Store, run_id: str) -> dict:
    """Nuclear-norm layer curves per variant (an item of the Ray pool each) and their early/middle/late differences."""
    from gradsift.signals.layer_curves import gsm8k_variants, third_diffs

    fs = config.fast_slow
    problems, quarantine = usable_rows(config, fs, lambda record: gsm8k_problem(record, fs.question, fs.answer))
    if not problems:
        hint = "Map the fields with fast_slow.question and fast_slow.answer"
        raise NoUsableRows(no_rows_message(config.data, quarantine, "gsm8k problem", hint))
    variants: dict[str, list[tuple[str, str]]] = {}
    for _, question, answer in problems:
        for name, pair in gsm8k_variants(question, answer).items():
            variants.setdefault(name, []).append(pair)
    names = sorted(variants)
    done = run_on_pool(VariantCurves, (config,), [(n, variants[n]) for n in names], config.ray)
    curves = {d["variant"]: d["curve"] for d in done}
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


def analyze_run(config: AnalyzeConfig) -> dict:
    """Run one analysis (``config.pairs`` or ``config.fast_slow``) on ``config.data`` as a committed run."""
    kind = "pairs" if config.pairs is not None else "fast_slow"

    def body(recorder: RunRecorder) -> dict:
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


def analyze(config: AnalyzeConfig, prefect: bool = False) -> dict:
    """``analyze_run`` directly, or as the flow ``gradsift-analyze``."""
    return flow_or_direct(__name__, "analyze_flow", analyze_run, config, prefect)


__getattr__ = lazy_flows(globals(), {"analyze_flow": ("gradsift-analyze", analyze_run)})
