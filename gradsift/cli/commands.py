"""The commands. Each one that makes a run takes one config model; its arguments and options are generated from
that model (gradsift.cli.options), so the command line, a TOML file (--config) and Python give the same config."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from gradsift.cli import output
from gradsift.cli.errors import config_problem, console, fail, reported
from gradsift.cli.options import Positional, Spec, command
from gradsift.cli.options import build_config as _build_config
from gradsift.env import state_dir
from gradsift.schemas.capture import FromRunConfig
from gradsift.schemas.config import AnalyzeConfig, NightlyConfig, RunConfig
from gradsift.schemas.train import EvaluateConfig, SelectConfig, TrainConfig


class _Cli(typer.Typer):
    """The command line app. Run as a program (the ``gradsift`` script, ``python -m gradsift.cli``) it first
    starts the reaper, so that whatever a command starts (a local Ray, Prefect's temporary server) dies with
    the process however it ends; invoked in-process (typer's CliRunner) it starts none. The small commands
    (``LIGHT``) start no service, so they start no reaper either: a second Python process on a busy machine."""

    def __call__(self, *args, **kwargs):
        if sys.argv[1:2] and sys.argv[1] not in LIGHT:
            from gradsift.reaper import start

            start()
        return super().__call__(*args, **kwargs)


LIGHT = frozenset({"status", "query", "select", "store", "--help", "--version"})


app = _Cli(
    help="Per-sample gradient signals for LM training data: scores in Parquet, SQL in DuckDB, curated data out. "
    "Every option of a run is a field of its config (see --help of each command; --config FILE.toml loads one).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

StoreOpt = Annotated[Path, typer.Option("--store", help="Store folder (its DuckLake: lake.sqlite + lake_data/).")]
RUN_NAMES = {"model.name_or_path": "model", "ray.address": "ray-address"}
NIGHTLY_NAMES = RUN_NAMES | {"report.enabled": "report", "report.top_n": "report-top-n"}
DATA = Positional("data", "ingest.sources", "sources")
WORK_POOL = inspect.Parameter(
    "work_pool",
    inspect.Parameter.KEYWORD_ONLY,
    default="gradsift-process",
    annotation=Annotated[str, typer.Option("--work-pool", help="Process work pool (created if missing).")],
)


PREFECT = inspect.Parameter(
    "prefect",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[
        bool,
        typer.Option(
            "--prefect",
            help="Run as the Prefect flow (a temporary local Prefect server unless PREFECT_API_URL is set); "
            "default: the same stages directly, or the flow where PREFECT_API_URL is set.",
        ),
    ],
)


def _nightly(*extras: inspect.Parameter) -> Spec:
    """NightlyConfig from --config; the options override it (--store made absolute: a worker runs elsewhere)."""
    return Spec(NightlyConfig, names=NIGHTLY_NAMES, config_required=True, resolve=("store",), extras=extras)


def build_config(argv: list[str]):
    """``(command, config)`` for the command line ``argv`` (``["train", "data.tsv", "--epochs", "2"]``), parsed
    as ``gradsift`` parses it, without running anything."""
    return _build_config(app, argv)


def _run_flow(kind: str, config, prefect: bool = False) -> None:
    """Run ``kind`` on ``config``: ingest and score as ``flows.runner`` decides (directly, or as the Prefect flow
    where a server is configured or ``prefect``), influence and nightly always as their Prefect flows."""
    if kind in ("ingest", "score"):
        from gradsift.flows import score as runs

        output.log_to_console()
        run = getattr(runs, kind)
        with reported():
            result = run(config, prefect)
    else:
        if kind == "influence":
            from gradsift.flows.influence import influence_flow as flow_fn
        else:
            from gradsift.flows.nightly import nightly_flow as flow_fn
        with reported():
            result = flow_fn(config)
    output.run_summary(result, config.store)


@app.command()
def demo(
    store: StoreOpt = Path("store"),
    rows: Annotated[int, typer.Option(help="Rows per demo domain.")] = 900,
) -> None:
    """Run the nightly curation flow on generated demo data with a tiny model (local Ray, no Prefect server)."""
    from gradsift.data.demo import write_demo_data

    info = write_demo_data(state_dir() / "demo-data", n_per_domain=rows)
    paths = info["paths"]
    sources = [
        {"path": paths["math"], "dataset": "math"},
        {"path": paths["reviews"], "dataset": "reviews"},
        {"path": paths["code"], "dataset": "code", "prompt": "instruction", "response": "output"},
        {"path": paths["target"], "dataset": "target_math"},
    ]
    console.print(f"demo data: {len(sources)} files in {state_dir() / 'demo-data'} ({info['defects']} planted defects)")
    data = {
        "store": str(store),
        "ingest": {"sources": sources},
        "score": {"engine": {"micro_batch_size": 32}},
        "target": {"name": "math", "datasets": ["target_math"]},
        "mixture": {},
    }
    try:
        config = NightlyConfig.model_validate(data)
    except ValueError as err:
        fail(config_problem(err))
    _run_flow("nightly", config)


@command(app, "nightly", _nightly())
def nightly(config: NightlyConfig) -> None:
    """Run the nightly curation flow once, now, from a config file."""
    _run_flow("nightly", config)


@command(app, "ingest", Spec(RunConfig, (DATA,), names=RUN_NAMES, exclude=("score", "ray"), extras=(PREFECT,)))
def ingest(config: RunConfig, prefect: bool) -> None:
    """Ingest DATA files into samples and quarantine (the model's tokenizer counts tokens); no scoring."""
    _run_flow("ingest", config, prefect)


@command(app, "score", Spec(RunConfig, (DATA,), names=RUN_NAMES, extras=(PREFECT,)))
def score(config: RunConfig, prefect: bool) -> None:
    """Ingest DATA files and score every sample: loss, grad norm, layer stats, projected features (a small
    input without a Ray cluster in this process, else on Ray actors)."""
    _run_flow("score", config, prefect)


@command(app, "influence", _nightly())
def influence(config: NightlyConfig) -> None:
    """Influence (LESS / TracIn / cosine) of the config's data on its target at training checkpoints,
    then the top-p% selection, mixture weights and the report (a NightlyConfig with target.checkpoints)."""
    _run_flow("influence", config)


ENGINE_SET = ("score.engine.parameters", "score.engine.layer_stats")  # analyses take every parameter, layer stats
ANALYZE = Spec(
    AnalyzeConfig,
    (Positional("kind", "kind", "variant"), Positional("data", "data", "value")),
    names=RUN_NAMES,
    exclude=("ingest", "model.task", "model.num_labels", "model.labels", *ENGINE_SET),  # what analyze ignores
    variants={"pairs": "pairs", "fast-slow": "fast_slow"},
    extras=(PREFECT,),
)


@command(app, "analyze", ANALYZE)
def analyze(config: AnalyzeConfig, prefect: bool) -> None:
    """Gradient analyses written to pair_scores, or layer_curves and layer_diffs, plus an HTML report.
    Preference pairs may come in any common layout (see --layout); rows that are not usable pairs go to
    the quarantine table with a reason, and the run goes on with the others."""
    from gradsift.flows.analyze import analyze as run_analyze
    from gradsift.flows.analyze import usable_pairs

    with reported():
        if config.pairs is not None:
            usable_pairs(config)  # a file without one usable pair fails here, with a message
        result = run_analyze(config, prefect)
    output.analyze_summary(result, config.store, "pairs" if config.pairs is not None else "fast-slow")


TRAIN = Spec(
    TrainConfig, (Positional("data", "data", "source"),), names={"ray.address": "ray-address"}, extras=(PREFECT,)
)


@command(app, "train", TRAIN)
def train(config: TrainConfig, prefect: bool) -> None:
    """Proxy-train a model on DATA, log per-sample dynamics, checkpoint each epoch, and write scores
    (EL2N, GraNd, forgetting, AUM, VoG, TracIn self-influence). The README's recipe for real data:
    --model minilm --mode frozen (a head on cached MiniLM embeddings)."""
    from gradsift.flows.train import train as run_train

    with reported():
        result = run_train(config, prefect)
    output.train_summary(result, config.store)


@command(app, "select", Spec(SelectConfig, extras=(PREFECT,)))
def select(config: SelectConfig, prefect: bool) -> None:
    """Selections from a train run's scores: keep a fraction by a score (drop easy or hard), a random
    baseline, or softmax sampling; writes the selections table and Parquet/JSONL manifests."""
    from gradsift.flows.select import select as run_select

    with reported():
        result = run_select(config, prefect)
    output.select_summary(result, config.store)


EVALUATE = Spec(
    EvaluateConfig,
    (Positional("eval_data", "eval_data", "source"),),
    names={"ray.address": "ray-address", "selection_runs": "selection-run"},
    extras=(PREFECT,),
)


@command(app, "evaluate", EVALUATE)
def evaluate(config: EvaluateConfig, prefect: bool) -> None:
    """Retrain from the same start on every selection and report held-out accuracy and loss
    (evaluations table, accuracy-vs-fraction plot, Prefect markdown artifact)."""
    from gradsift.flows.evaluate import evaluate as run_evaluate

    with reported():
        result = run_evaluate(config, prefect)
    output.evaluate_summary(result)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="A read-only SQL statement over the store's views (scores, samples, runs, ...).")],
    store: StoreOpt = Path("store"),
    format: Annotated[
        Literal["table", "csv", "json", "parquet"], typer.Option("--format", help="Output format.")
    ] = "table",
    output_file: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    limit: Annotated[int, typer.Option(help="Rows shown in table format.")] = 50,
    timeout: Annotated[
        float | None, typer.Option(help="Interrupt the query after this many seconds (default: no limit).")
    ] = None,
) -> None:
    """Run one read-only SELECT over the tables (runs, samples, quarantine, scores, layer_stats, features, ...).

    Anything else (COPY, EXPORT, INSTALL/LOAD, ATTACH, SET, CREATE, INSERT, ...) and files outside the store's
    tables are refused; Ctrl-C or --timeout interrupts a running query."""
    if timeout is not None and not timeout > 0:
        fail(f"--timeout must be a positive number of seconds, got {timeout:g}")
    try:  # the imports too: a Ctrl-C while they load is the same interrupted query
        import os

        import duckdb

        from gradsift.storage.catalog import QueryTimeoutError, ReadOnlyQueryError
        from gradsift.storage.catalog import query as run_query
        from gradsift.storage.store import OldLayoutError, Store

        result = run_query(Store(store), sql, timeout=timeout)
    except KeyboardInterrupt:
        console.print("[bold red]query interrupted[/] (Ctrl-C); nothing was written")
        raise typer.Exit(130) from None
    except QueryTimeoutError:
        console.print(
            f"[bold red]query timed out[/] after --timeout {timeout:g} s and was interrupted: "
            "narrow the query or raise --timeout"
        )
        raise typer.Exit(124) from None
    except (ReadOnlyQueryError, FileNotFoundError, OldLayoutError, duckdb.Error) as err:
        st = Store(store)
        data = f"{st.lake().data_path}{os.sep}"
        broken = isinstance(err, duckdb.Error) and data in str(err)  # a data file it could not read
        fail(f"{err}\n`gradsift store check --store {st.root}` lists broken data files" if broken else str(err))
    output.query_result(result, format, output_file, limit)


def _require_server() -> str:
    import os

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        fail(
            "no Prefect server: start one with `gradsift server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API and UI.")] = 4200,
) -> None:
    """Start a Prefect server (API, UI, scheduler) with the project's settings, in the foreground."""
    import os
    import subprocess

    url = f"http://{host}:{port}"
    console.print(f"Prefect UI: [bold]{url}[/]   (PREFECT_HOME={os.environ['PREFECT_HOME']})")
    console.print(f"In other shells: export PREFECT_API_URL={url}/api   then gradsift deploy / serve / status")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.run(cmd, env={**os.environ, "PREFECT_UI_API_URL": f"{url}/api"}).returncode)


@command(app, "deploy", _nightly(WORK_POOL))
def deploy(config: NightlyConfig, work_pool: str) -> None:
    """Register the nightly deployment (cron from the config) on the server at PREFECT_API_URL."""
    url = _require_server()
    from gradsift.deployments.nightly import register

    deployment_id = register(config, work_pool)
    console.print(f"registered gradsift-nightly/nightly ({deployment_id}) on {url}, cron '{config.schedule}' UTC")
    console.print(f"Run it with a worker: prefect worker start --pool {work_pool}   (or use `gradsift serve`)")


@command(app, "serve", _nightly())
def serve(config: NightlyConfig) -> None:
    """Register the nightly deployment and run it from this process, on schedule or when triggered."""
    _require_server()
    from prefect import serve as prefect_serve

    from gradsift.deployments.nightly import nightly_deployment

    prefect_serve(nightly_deployment(config), limit=1)


@app.command()
def status(
    store: StoreOpt = Path("store"),
    limit: Annotated[int, typer.Option(help="Runs shown, newest first.")] = 10,
) -> None:
    """Last runs in the store (state, rows written, times, by commit order) and the run holding the writer lock, if
    any. A run in progress has no ``runs`` row until it commits (or fails): one staged that does not hold the lock
    died mid-run and shows as interrupted."""
    import json
    from datetime import datetime

    from gradsift.storage.lock import current_holder
    from gradsift.storage.store import Store

    st = Store(store)
    with reported():
        runs = list(reversed(st.runs()))
    done = {r["run_id"] for r in runs}
    for staged in sorted(st.staging_root.glob("*/_stages/_run")) if st.staging_root.is_dir() else []:
        if (run_id := staged.parent.parent.name) not in done:
            info = json.loads(staged.read_text())
            started = datetime.fromisoformat(info["started_at"])
            runs.insert(0, {"run_id": run_id, "flow": info.get("flow"), "status": "running", "started_at": started,
                            "finished_at": None, "rows_written": None, "note": None})  # fmt: skip
    runs = runs[:limit]
    holder = current_holder(st)
    if not runs and holder is None:
        fail(f"no runs in {st.root}: run a flow first (gradsift demo / score / nightly)")
    output.runs_table(st.root, runs, holder)


scores_app = typer.Typer(help="Scores of runs trained elsewhere (gradsift.capture).", no_args_is_help=True)
app.add_typer(scores_app, name="scores")


@command(scores_app, "from-run", Spec(FromRunConfig, (Positional("run", "run", "value"),)), "scores")
def scores_from_run(config: FromRunConfig) -> None:
    """EL2N, forgetting, AUM, GraNd and TracIn self-influence of a run recorded with gradsift.capture (HF Trainer
    callback or plain loop), into ``scores`` as run capture-RUN (select/evaluate then work on it)."""
    from gradsift.capture.scores import score_captured_run

    with reported():
        result = score_captured_run(config)
    typer.echo(f"{result['run_id']}: {result['samples']} samples scored from {result['visits']} visits")


from gradsift.cli.store import store_app  # noqa: E402  (it uses StoreOpt)

app.add_typer(store_app, name="store")
