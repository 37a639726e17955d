"""The gradsift command line: few, stable commands. Run `gradsift COMMAND --help` for each."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradsift.env import configure_environment, state_dir

configure_environment()  # before prefect or ray is imported anywhere


class _Cli(typer.Typer):
    """The command line app. Run as a program (the ``gradsift`` script, ``python -m gradsift.cli``) it first
    starts the reaper, so that whatever a command starts (a local Ray, Prefect's temporary server) dies with
    the process however it ends; invoked in-process (typer's CliRunner) it starts none."""

    def __call__(self, *args, **kwargs):
        from gradsift.reaper import start

        start()
        return super().__call__(*args, **kwargs)


app = _Cli(
    help="Per-sample gradient signals for LM training data: scores in Parquet, SQL in DuckDB, curated data out.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()

StoreOpt = Annotated[Path, typer.Option("--store", help="Store folder (Parquet tables + catalog.duckdb).")]
RayOpt = Annotated[
    str | None, typer.Option("--ray-address", envvar="RAY_ADDRESS", help="Join this Ray cluster (default: local Ray).")
]

EXAMPLE_QUERIES = [
    "SELECT count(*) FROM scores",
    "SELECT domain, count(*) AS n, round(avg(loss), 3) AS loss, round(avg(grad_norm), 3) AS grad_norm "
    "FROM scores JOIN samples USING (dataset, sample_id) GROUP BY domain ORDER BY domain",
    "SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY 2 DESC",
]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def _failure(err: BaseException) -> tuple[BaseException, str]:
    """The real error behind a failed run and its message: a Ray task's error is its cause; an OSError reads
    ``path: reason``."""
    from gradsift.flows.retry import root_cause

    err = root_cause(err)
    if isinstance(err, OSError) and err.strerror:
        return err, f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return err, str(err)


@contextmanager
def _reported():
    """Inside: a failure the user can act on (a bad model folder or config, an unreadable input, a locked
    store, an OSError such as a full disk; also when a Ray task raised it) is an ``error:`` line and exit 2;
    any other failure keeps its traceback."""
    from gradsift.data.ingest import IngestError
    from gradsift.storage.lock import StoreLocked

    try:
        yield
    except Exception as err:
        cause, message = _failure(err)
        if not isinstance(cause, ValueError | OSError | IngestError | StoreLocked):  # ModelFolderError: ValueError
            raise
        _fail(message)


def _summary(result: dict, store: Path) -> None:
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
    table.add_row("catalog", str(Path(result["store"]) / "catalog.duckdb"))
    console.print(table)
    console.print("Try:")
    for sql in EXAMPLE_QUERIES:
        console.print(f'  gradsift query --store {store} "{sql}"', soft_wrap=True, highlight=False)


def _config_problem(err: ValueError) -> str:
    """A config error as one line per field ("score.engine.typo: Extra inputs are not permitted")."""
    from pydantic import ValidationError

    if not isinstance(err, ValidationError):
        return str(err)
    lines = [f"invalid configuration ({err.error_count()} problem{'s' if err.error_count() > 1 else ''}):"]
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "(top level)"
        given = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r:.60})"
        lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}{given}")
    return "\n".join(lines)


def _build_config(data: dict):
    from gradsift.schemas.config import NightlyConfig

    try:
        return NightlyConfig.model_validate(data)
    except ValueError as err:
        _fail(_config_problem(err))


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
    config = _build_config(
        {
            "store": str(store),
            "ingest": {"sources": sources},
            "score": {"engine": {"micro_batch_size": 32}},
            "target": {"name": "math", "datasets": ["target_math"]},
            "mixture": {},
        }
    )
    _run_flow("nightly", config)


ConfigOpt = Annotated[Path, typer.Option("--config", help="TOML file of a NightlyConfig.")]
StoreOverride = Annotated[Path | None, typer.Option("--store", help="Override the config's store.")]


def _load_nightly(config: Path, store: Path | None, ray_address: str | None):
    from gradsift.schemas.config import NightlyConfig

    try:
        cfg = NightlyConfig.from_toml(config)
    except (OSError, ValueError) as err:
        _fail(f"{config}: {_config_problem(err) if isinstance(err, ValueError) else err}")
    updates = {"store": str(store.resolve())} if store else {}
    if ray_address:
        updates["ray"] = cfg.ray.model_copy(update={"address": ray_address})
    return cfg.model_copy(update=updates)


@app.command()
def nightly(config: ConfigOpt, store: StoreOverride = None, ray_address: RayOpt = None) -> None:
    """Run the nightly curation flow once, now, from a config file."""
    _run_flow("nightly", _load_nightly(config, store, ray_address))


DataArg = Annotated[list[Path], typer.Argument(help="Input files (.jsonl .json .csv .tsv .parquet, optionally .gz).")]
ModelOpt = Annotated[str, typer.Option(help="'tiny' or a local Hugging Face model folder.")]
PromptOpt = Annotated[str, typer.Option(help="Prompt field name.")]
ResponseOpt = Annotated[str, typer.Option(help="Response field name.")]
TextOpt = Annotated[str, typer.Option(help="Text field name (no prompt/response).")]
LabelOpt = Annotated[str, typer.Option(help="Label field name.")]
ColumnsOpt = Annotated[
    str | None, typer.Option(help="Column names of a CSV/TSV without a header, comma-separated (e.g. text,label).")
]
NumLabelsOpt = Annotated[int | None, typer.Option(help="Classifier: number of classes.")]
ClassesOpt = Annotated[
    str | None, typer.Option("--labels", help="Classifier: class names in index order, comma-separated.")
]
MaxTokensOpt = Annotated[int, typer.Option(help="Quarantine samples longer than this many tokens.")]
ShardOpt = Annotated[int, typer.Option(help="Samples per shard (the unit of work and resume).")]
BadFileOpt = Annotated[
    str, typer.Option(help="A file that cannot be read at all: skip (reported in quarantine, line 0) or fail.")
]


def _data_config(
    data, model, store, prompt, response, text, label, num_labels, labels, columns, max_tokens, shard_size, on_bad_file
) -> dict:
    fields = {"prompt": prompt, "response": response, "text": text, "label": label}
    if columns:
        fields["columns"] = columns.split(",")
    return {
        "store": str(store),
        "model": {
            "name_or_path": model,
            "num_labels": num_labels,
            "labels": labels.split(",") if labels else None,
            "max_tokens": max_tokens,
        },
        "ingest": {
            "sources": [{"path": str(p), **fields} for p in data],
            "shard_size": shard_size,
            "on_bad_file": on_bad_file,
        },
    }


@app.command()
def ingest(
    data: DataArg,
    model: ModelOpt = "tiny",
    store: StoreOpt = Path("store"),
    prompt_field: PromptOpt = "prompt",
    response_field: ResponseOpt = "response",
    text_field: TextOpt = "text",
    label_field: LabelOpt = "label",
    num_labels: NumLabelsOpt = None,
    labels: ClassesOpt = None,
    columns: ColumnsOpt = None,
    max_tokens: MaxTokensOpt = 512,
    shard_size: ShardOpt = 256,
    on_bad_file: BadFileOpt = "skip",
) -> None:
    """Ingest DATA files into samples and quarantine (the model's tokenizer counts tokens); no scoring."""
    fields = (prompt_field, response_field, text_field, label_field, num_labels, labels, columns, max_tokens)
    fields += (shard_size, on_bad_file)
    _run_flow("ingest", _build_config(_data_config(data, model, store, *fields)))


@app.command()
def score(
    data: DataArg,
    model: ModelOpt = "tiny",
    store: StoreOpt = Path("store"),
    prompt_field: PromptOpt = "prompt",
    response_field: ResponseOpt = "response",
    text_field: TextOpt = "text",
    label_field: LabelOpt = "label",
    num_labels: NumLabelsOpt = None,
    labels: ClassesOpt = None,
    columns: ColumnsOpt = None,
    max_tokens: MaxTokensOpt = 512,
    shard_size: ShardOpt = 256,
    on_bad_file: BadFileOpt = "skip",
    feature_dim: Annotated[int, typer.Option(help="Projected gradient feature dimension (0: none).")] = 8192,
    num_actors: Annotated[int, typer.Option(help="Ray scoring actors.")] = 2,
    ray_address: RayOpt = None,
) -> None:
    """Ingest DATA files and score every sample: loss, grad norm, layer stats, projected features."""
    fields = (prompt_field, response_field, text_field, label_field, num_labels, labels, columns, max_tokens)
    fields += (shard_size, on_bad_file)
    config = _data_config(data, model, store, *fields)
    config["score"] = {"engine": {"feature_dim": feature_dim}}
    config["ray"] = {"num_actors": num_actors, **({"address": ray_address} if ray_address else {})}
    _run_flow("score", _build_config(config))


def _run_flow(kind: str, config) -> None:
    if kind == "ingest":
        from gradsift.flows.score import ingest_flow as flow_fn
    elif kind == "score":
        from gradsift.flows.score import score_flow as flow_fn
    elif kind == "influence":
        from gradsift.flows.influence import influence_flow as flow_fn
    else:
        from gradsift.flows.nightly import nightly_flow as flow_fn
    with _reported():
        result = flow_fn(config)
    _summary(result, Path(config.store))


@app.command()
def influence(config: ConfigOpt, store: StoreOverride = None, ray_address: RayOpt = None) -> None:
    """Influence (LESS / TracIn / cosine) of the config's data on its target at training checkpoints,
    then the top-p% selection, mixture weights and the report (a NightlyConfig with target.checkpoints)."""
    _run_flow("influence", _load_nightly(config, store, ray_address))


@app.command()
def analyze(
    kind: Annotated[str, typer.Argument(help="pairs (preference-pair entanglement) or fast-slow (layer curves).")],
    data: Annotated[
        Path, typer.Argument(help="pairs: preference pairs .jsonl(.gz)/.json/.parquet; fast-slow: gsm8k-style .jsonl.")
    ],
    model: Annotated[str, typer.Option(help="'tiny' or a local Hugging Face causal LM folder.")] = "tiny",
    store: StoreOpt = Path("store"),
    limit: Annotated[int | None, typer.Option(help="Use the first N records (pairs: usable pairs).")] = None,
    max_tokens: Annotated[
        int,
        typer.Option(help="Tokens kept per sample (pairs too long keep the prompt's end and the responses' start)."),
    ] = 512,
    layout: Annotated[str, typer.Option(help="pairs: auto, prompt, hh, conversations or messages.")] = "auto",
    prompt_field: Annotated[
        str | None, typer.Option(help="pairs: prompt field, a string or a message list (default: prompt).")
    ] = None,
    chosen_field: Annotated[
        str | None, typer.Option(help="pairs: chosen response, dialogue or messages field (default: chosen).")
    ] = None,
    rejected_field: Annotated[
        str | None, typer.Option(help="pairs: rejected response, dialogue or messages field (default: rejected).")
    ] = None,
    conversations_field: Annotated[
        str | None, typer.Option(help="pairs: field of the {from, value} prompt turns (default: conversations).")
    ] = None,
    ray_address: RayOpt = None,
) -> None:
    """Gradient analyses written to pair_scores, or layer_curves and layer_diffs, plus an HTML report.
    Preference pairs may come in any common layout (see --layout); rows that are not usable pairs go to
    the quarantine table with a reason, and the run goes on with the others."""
    from gradsift.flows.analyze import TRUNCATION, analyze_flow, usable_pairs
    from gradsift.schemas.config import AnalyzeConfig

    if kind not in {"pairs", "fast-slow"}:
        _fail(f"unknown analysis {kind!r}: use pairs or fast-slow")
    fields = {
        "prompt": prompt_field,
        "chosen": chosen_field,
        "rejected": rejected_field,
        "conversations": conversations_field,
    }
    pairs = {k: v for k, v in fields.items() if v is not None} | ({"layout": layout} if layout != "auto" else {})
    if kind != "pairs" and pairs:
        _fail("--layout and the --*-field options apply to analyze pairs only")
    options = ({"limit": limit} if limit else {}) | pairs
    try:
        cfg = AnalyzeConfig(
            store=str(store),
            data=str(data),
            model={"name_or_path": model, "max_tokens": max_tokens},
            **({"ray": {"address": ray_address}} if ray_address else {}),
            **{"pairs" if kind == "pairs" else "fast_slow": options},
        )
    except ValueError as err:
        _fail(str(err))
    with _reported():
        if kind == "pairs":
            usable_pairs(cfg)  # a file without one usable pair fails here, with a message
        result = analyze_flow(cfg)
    console.print(f"run {result['run_id']}: {result['status']}; report {result.get('report', '-')}")
    if info := result.get("pairs"):
        console.print(
            f"{info['rows']} pairs scored, {info['quarantined']} rows quarantined; "
            f"{info['truncated']} of {info['rows']} pairs truncated to {info['max_tokens']} tokens ({TRUNCATION})",
            highlight=False,
        )
        if info["quarantined"]:
            sql = f"SELECT line, reason FROM quarantine WHERE run_id = '{result['run_id']}' ORDER BY line"
            console.print(f'Quarantined rows: gradsift query --store {store} "{sql}"', highlight=False, soft_wrap=True)
    table = "pair_scores" if kind == "pairs" else "layer_diffs"
    console.print(f'Try: gradsift query --store {store} "SELECT * FROM {table} LIMIT 20"', highlight=False)


def _help(model: str, name: str) -> str:
    """A config field's description (schemas/train.py) as option help."""
    from gradsift.schemas import train as schemas

    return getattr(schemas, model).model_fields[name].description


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _source(path: Path, text_field: str, label_field: str, columns: str | None) -> dict:
    cols = {"columns": columns.split(",")} if columns else {}
    return {"path": str(path), "text": text_field, "label": label_field, **cols}


TextOpt = Annotated[str, typer.Option(help="Text field (or column) name.")]
LabelOpt = Annotated[str, typer.Option(help="Label field (or column) name.")]
SeedsOpt = Annotated[str, typer.Option(help="Seeds, comma-separated.")]


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="Training data (.jsonl .json .csv .tsv .parquet).")],
    model: Annotated[str, typer.Option(help=_help("TrainConfig", "model"))] = "minilm",
    mode: Annotated[str, typer.Option(help=_help("TrainConfig", "mode"))] = "frozen",
    task: Annotated[str, typer.Option(help=_help("TrainConfig", "task"))] = "classification",
    lora: Annotated[bool, typer.Option(help=_help("TrainConfig", "lora"))] = False,
    epochs: Annotated[int, typer.Option(help=_help("TrainConfig", "epochs"))] = 8,
    lr: Annotated[float, typer.Option(help=_help("TrainConfig", "lr"))] = 1e-3,
    batch_size: Annotated[int, typer.Option(help=_help("TrainConfig", "batch_size"))] = 32,
    head_hidden: Annotated[int, typer.Option(help=_help("TrainConfig", "head_hidden"))] = 256,
    max_length: Annotated[int, typer.Option(help=_help("TrainConfig", "max_length"))] = 128,
    score_epoch: Annotated[int, typer.Option(help=_help("TrainConfig", "score_epoch"))] = 2,
    aum_threshold_samples: Annotated[bool, typer.Option(help=_help("TrainConfig", "aum_threshold_samples"))] = False,
    gradient_scores: Annotated[bool, typer.Option(help=_help("TrainConfig", "gradient_scores"))] = True,
    seeds: SeedsOpt = "0,1,2",
    embed_cache: Annotated[Path | None, typer.Option(help=_help("TrainConfig", "embed_cache"))] = None,
    text_field: TextOpt = "text",
    label_field: LabelOpt = "label",
    columns: ColumnsOpt = None,
    store: StoreOpt = Path("store"),
    ray_address: RayOpt = None,
) -> None:
    """Proxy-train a model on DATA, log per-sample dynamics, checkpoint each epoch, and write scores
    (EL2N, GraNd, forgetting, AUM, VoG, TracIn self-influence). Defaults: frozen MiniLM + MLP head."""
    from gradsift.flows.train import train_flow
    from gradsift.schemas.train import TrainConfig

    try:
        cfg = TrainConfig(
            store=str(store),
            data=_source(data, text_field, label_field, columns),
            model=model,
            mode=mode,
            task=task,
            lora=lora,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            head_hidden=head_hidden,
            max_length=max_length,
            score_epoch=score_epoch,
            aum_threshold_samples=aum_threshold_samples,
            gradient_scores=gradient_scores,
            seeds=[int(x) for x in seeds.split(",")],
            embed_cache=str(embed_cache) if embed_cache else None,
            **({"ray": {"address": ray_address}} if ray_address else {}),
        )
    except ValueError as err:
        _fail(str(err))
    with _reported():
        result = train_flow(cfg)
    console.print(f"train run {result['run_id']}: {result['status']}")
    console.print(
        f"Try: gradsift query --store {store} \"SELECT * FROM scores WHERE run_id = '{result['run_id']}' "
        'ORDER BY aum LIMIT 20"',
        highlight=False,
    )


@app.command()
def select(
    scores_run: Annotated[str, typer.Option(help=_help("SelectConfig", "scores_run"))],
    score: Annotated[str | None, typer.Option(help=_help("SelectConfig", "score"))] = None,
    fractions: Annotated[str, typer.Option(help="Fractions kept, comma-separated.")] = "0.85,0.7,0.55,0.4",
    drop: Annotated[str, typer.Option(help=_help("SelectConfig", "drop"))] = "easy",
    method: Annotated[str, typer.Option(help=_help("SelectConfig", "method"))] = "keep",
    temperature: Annotated[float, typer.Option(help=_help("SelectConfig", "temperature"))] = 1.0,
    stratify: Annotated[str, typer.Option(help=_help("SelectConfig", "stratify"))] = "label",
    seeds: SeedsOpt = "0",
    store: StoreOpt = Path("store"),
) -> None:
    """Selections from a train run's scores: keep a fraction by a score (drop easy or hard), a random
    baseline, or softmax sampling; writes the selections table and Parquet/JSONL manifests."""
    from gradsift.flows.select import select_flow
    from gradsift.schemas.train import SelectConfig

    try:
        cfg = SelectConfig(
            store=str(store),
            scores_run=scores_run,
            score=score,
            fractions=_floats(fractions),
            drop=drop,
            method=method,
            temperature=temperature,
            stratify=stratify,
            seeds=[int(x) for x in seeds.split(",")],
        )
    except ValueError as err:
        _fail(str(err))
    with _reported():
        result = select_flow(cfg)
    console.print(f"select run {result['run_id']}: {result['status']}; {', '.join(result.get('selections', []))}")
    console.print(f"manifests: {Path(store) / 'manifests' / result['run_id']}", highlight=False)


@app.command()
def evaluate(
    eval_data: Annotated[Path, typer.Argument(help="Held-out data with the same labels.")],
    train_run: Annotated[str, typer.Option(help=_help("EvaluateConfig", "train_run"))],
    selection_run: Annotated[list[str], typer.Option(help="A select run to evaluate (repeat the option).")],
    seeds: SeedsOpt = "0,1,2",
    budget: Annotated[str, typer.Option(help=_help("EvaluateConfig", "budget"))] = "epochs",
    include_full: Annotated[bool, typer.Option(help=_help("EvaluateConfig", "include_full"))] = True,
    plot: Annotated[Path | None, typer.Option(help=_help("EvaluateConfig", "plot"))] = None,
    text_field: TextOpt = "text",
    label_field: LabelOpt = "label",
    columns: ColumnsOpt = None,
    store: StoreOpt = Path("store"),
    ray_address: RayOpt = None,
) -> None:
    """Retrain from the same start on every selection and report held-out accuracy and loss
    (evaluations table, accuracy-vs-fraction plot, Prefect markdown artifact)."""
    from gradsift.flows.evaluate import evaluate_flow
    from gradsift.schemas.train import EvaluateConfig

    try:
        cfg = EvaluateConfig(
            store=str(store),
            train_run=train_run,
            selection_runs=selection_run,
            eval_data=_source(eval_data, text_field, label_field, columns),
            seeds=[int(x) for x in seeds.split(",")],
            budget=budget,
            include_full=include_full,
            plot=str(plot) if plot else None,
            **({"ray": {"address": ray_address}} if ray_address else {}),
        )
    except ValueError as err:
        _fail(str(err))
    with _reported():
        result = evaluate_flow(cfg)
    console.print(result.get("summary", ""), highlight=False)
    console.print(f"plot: {result.get('plot', '-')}", highlight=False)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="A read-only SQL statement over the catalog's tables.")],
    store: StoreOpt = Path("store"),
    format: Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    limit: Annotated[int, typer.Option(help="Rows shown in table format.")] = 50,
    timeout: Annotated[
        float | None, typer.Option(help="Interrupt the query after this many seconds (default: no limit).")
    ] = None,
) -> None:
    """Run one read-only SELECT over the tables (runs, samples, quarantine, scores, layer_stats, features, ...).

    Anything else (COPY, EXPORT, INSTALL/LOAD, ATTACH, SET, CREATE, INSERT, ...) and files outside the store's
    tables are refused; Ctrl-C or --timeout interrupts a running query."""
    import duckdb

    from gradsift.storage.catalog import QueryTimeoutError, ReadOnlyQueryError
    from gradsift.storage.catalog import query as run_query
    from gradsift.storage.store import Store

    if format not in {"table", "csv", "json", "parquet"}:
        _fail(f"unknown --format {format!r}: use table, csv, json or parquet")
    if timeout is not None and not timeout > 0:
        _fail(f"--timeout must be a positive number of seconds, got {timeout:g}")
    try:
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
    except (ReadOnlyQueryError, FileNotFoundError, duckdb.Error) as err:
        _fail(str(err))
    if format == "parquet":
        if output is None:
            _fail("--format parquet needs --output FILE")
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
        table.add_row(*[_cell(v) for v in row.values()])
    console.print(table)
    if result.num_rows > limit:
        console.print(f"({result.num_rows} rows, {limit} shown; --limit to see more)")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return "" if value is None else str(value)


def _require_server() -> str:
    import os

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        _fail(
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


@app.command()
def deploy(
    config: ConfigOpt,
    work_pool: Annotated[str, typer.Option(help="Process work pool (created if missing).")] = "gradsift-process",
    store: StoreOverride = None,
    ray_address: RayOpt = None,
) -> None:
    """Register the nightly deployment (cron from the config) on the server at PREFECT_API_URL."""
    url = _require_server()
    from gradsift.deployments.nightly import register

    cfg = _load_nightly(config, store, ray_address)
    deployment_id = register(cfg, work_pool)
    console.print(f"registered gradsift-nightly/nightly ({deployment_id}) on {url}, cron '{cfg.schedule}' UTC")
    console.print(f"Run it with a worker: prefect worker start --pool {work_pool}   (or use `gradsift serve`)")


@app.command()
def serve(config: ConfigOpt, store: StoreOverride = None, ray_address: RayOpt = None) -> None:
    """Register the nightly deployment and run it from this process, on schedule or when triggered."""
    _require_server()
    from prefect import serve as prefect_serve

    from gradsift.deployments.nightly import nightly_deployment

    prefect_serve(nightly_deployment(_load_nightly(config, store, ray_address)), limit=1)


@app.command()
def status(
    store: StoreOpt = Path("store"),
    limit: Annotated[int, typer.Option(help="Runs shown, newest first.")] = 10,
) -> None:
    """Last runs in the store (state, rows written, times) and the run holding the writer lock, if any. A run
    recorded as running that does not hold the lock died mid-run: it shows as interrupted."""
    from gradsift.storage.lock import current_holder
    from gradsift.storage.store import Store

    st = Store(store)
    runs = sorted(st.runs(), key=lambda r: r["started_at"] or r["finished_at"], reverse=True)[:limit]
    if not runs:
        _fail(f"no runs in {st.root}: run a flow first (gradsift demo / score / nightly)")
    holder = current_holder(st)
    live = None if holder is None else holder.get("run_id", "?")  # "?": held, but by a holder that left no name
    table = Table("run_id", "flow", "status", "started", "seconds", "rows written", "note", title=f"runs in {st.root}")
    interrupted = False
    for r in runs:
        seconds = (r["finished_at"] - r["started_at"]).total_seconds() if r["finished_at"] and r["started_at"] else None
        started = r["started_at"].strftime("%Y-%m-%d %H:%M:%S") if r["started_at"] else ""
        state = r["status"]
        if state == "running" and live not in ("?", r["run_id"]):
            state, interrupted = "interrupted", True
        table.add_row(
            r["run_id"], r["flow"], state, started, _cell(seconds), _cell(r["rows_written"]), _cell(r["note"])
        )
    console.print(table)
    if interrupted:
        console.print("interrupted: the process died mid-run; the same command again resumes it from what it staged")
    if holder is not None:
        console.print(
            f"writer lock held by run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')})"
        )


if __name__ == "__main__":
    app()
