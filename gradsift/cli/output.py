"""What the commands print: run summaries with example queries, query results in each format, the runs table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.table import Table

from gradsift.cli.errors import console, fail

EXAMPLE_QUERIES = [
    "SELECT count(*) FROM scores",
    "SELECT domain, count(*) AS n, round(avg(loss), 3) AS loss, round(avg(grad_norm), 3) AS grad_norm "
    "FROM scores JOIN samples USING (dataset, sample_id) GROUP BY domain ORDER BY domain",
    "SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY 2 DESC",
]


def log_to_console() -> None:
    """Show the ``gradsift`` logger's progress lines (INFO and up) on the console: what a run outside Prefect
    logs (inside a flow run the stages log through Prefect's run logger, which prints its own)."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("gradsift")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_path=False))
        logger.setLevel(logging.INFO)


def _try(store, sql: str, prefix: str = "Try: ") -> None:
    console.print(f'{prefix}gradsift query --store {store} "{sql}"', highlight=False, soft_wrap=True)


def run_summary(result: dict, store) -> None:
    """An ingest, score, nightly or influence run: rows per stage, selections, mixture, report; example queries."""
    ingest, score = result.get("ingest", {}), result.get("score", {})
    table = Table("what", "value", title=f"gradsift run {result['run_id']}: {result['status']}", show_header=False)
    if ingest:
        table.add_row("rows ingested", str(ingest["samples"]))
        table.add_row("rows quarantined", str(ingest["quarantined"]))
    if score:
        table.add_row(
            "rows scored",
            f"{score['rows']} ({score['shards_scored']} shards, {score['shards_resumed']} resumed, "
            f"{score.get('shards_reused', 0)} reused from earlier runs)",
        )
    for stage in ("select", "mixture"):
        if result.get(stage, {}).get("selection"):
            table.add_row(f"selection ({stage})", f"{result[stage]['selection']}: {result[stage]['kept']} kept")
    if weights := result.get("mixture", {}).get("weights"):
        table.add_row("mixture weights", ", ".join(f"{d} {w:.2f}" for d, w in sorted(weights.items())))
    if report := result.get("report", {}).get("report"):
        table.add_row("report", report)
    table.add_row("lake", str(Path(result["store"]) / "lake.sqlite"))
    console.print(table)
    console.print("Try:")
    for sql in EXAMPLE_QUERIES:
        _try(store, sql, "  ")


def analyze_summary(result: dict, store, kind: str) -> None:
    from gradsift.flows.analyze import TRUNCATION

    console.print(f"run {result['run_id']}: {result['status']}; report {result.get('report', '-')}")
    if info := result.get("pairs"):
        console.print(
            f"{info['rows']} pairs scored, {info['quarantined']} rows quarantined; "
            f"{info['truncated']} of {info['rows']} pairs truncated to {info['max_tokens']} tokens ({TRUNCATION})",
            highlight=False,
        )
        if info["quarantined"]:
            sql = f"SELECT line, reason, detail FROM quarantine WHERE run_id = '{result['run_id']}' ORDER BY line"
            _try(store, sql, "Quarantined rows: ")
    _try(store, f"SELECT * FROM {'pair_scores' if kind == 'pairs' else 'layer_diffs'} LIMIT 20")


def train_summary(result: dict, store) -> None:
    console.print(f"train run {result['run_id']}: {result['status']}")
    _try(store, f"SELECT * FROM scores WHERE run_id = '{result['run_id']}' ORDER BY aum LIMIT 20")


def select_summary(result: dict, store) -> None:
    console.print(f"select run {result['run_id']}: {result['status']}; {', '.join(result.get('selections', []))}")
    if result.get("reason"):  # --auto's choice, or the direction rule's when no --drop was given
        console.print(result["reason"], highlight=False)
    console.print(f"manifests: {Path(store) / 'manifests' / result['run_id']}", highlight=False)


def evaluate_summary(result: dict) -> None:
    console.print(result.get("summary", ""), highlight=False)
    console.print(f"plot: {result.get('plot', '-')}", highlight=False)


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return "" if value is None else str(value)


def query_result(result, format: str, output: Path | None, limit: int) -> None:
    """A query's Arrow table as a rich table (``limit`` rows), CSV, JSON lines or Parquet (to ``output``)."""
    if format == "parquet":
        if output is None:
            fail("--format parquet needs --output FILE")
        import pyarrow.parquet as pq

        pq.write_table(result, output)
        console.print(f"wrote {result.num_rows} rows to {output}")
        return
    if format in {"csv", "json"}:
        import pyarrow.csv as pcsv

        if format == "csv":
            sink = output.open("wb") if output else sys.stdout.buffer
            pcsv.write_csv(result, sink)
        else:
            text = "\n".join(json.dumps(r, default=str) for r in result.to_pylist()) + "\n"
            output.write_text(text) if output else sys.stdout.write(text)
        return
    table = Table(*result.column_names)
    for row in result.slice(0, limit).to_pylist():
        table.add_row(*[cell(v) for v in row.values()])
    console.print(table)
    if result.num_rows > limit:
        console.print(f"({result.num_rows} rows, {limit} shown; --limit to see more)")


def runs_table(store_root, runs: list[dict], holder: dict | None) -> None:
    """The last runs, a run recorded as running that does not hold the writer lock shown as interrupted."""
    live = None if holder is None else holder.get("run_id", "?")  # "?": held, but by a holder that left no name
    table = Table(
        "run_id", "flow", "status", "started", "seconds", "rows written", "note", title=f"runs in {store_root}"
    )
    interrupted = False
    for r in runs:
        seconds = (r["finished_at"] - r["started_at"]).total_seconds() if r["finished_at"] and r["started_at"] else None
        started = r["started_at"].strftime("%Y-%m-%d %H:%M:%S") if r["started_at"] else ""
        state = r["status"]
        if state == "running" and live not in ("?", r["run_id"]):
            state, interrupted = "interrupted", True
        table.add_row(r["run_id"], r["flow"], state, started, cell(seconds), cell(r["rows_written"]), cell(r["note"]))
    console.print(table)
    if interrupted:
        console.print("interrupted: the process died mid-run; the same command again resumes it from what it staged")
    if holder is not None:
        console.print(
            f"writer lock held by run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')})"
        )
