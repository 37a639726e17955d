"""One config model per command: the command line, a TOML file and Python build the same config and the same run
id; the options are the model's fields, with its defaults, descriptions and choices."""

from __future__ import annotations

import os
import re
import subprocess
import typing

import pytest
from live_services import GRADSIFT
from pydantic import BaseModel
from typer.testing import CliRunner

from gradsift.cli import app, build_config
from gradsift.cli.options import COMMANDS, ConfigError
from gradsift.schemas.config import AnalyzeConfig, DataSource, NightlyConfig, RunConfig
from gradsift.schemas.train import EvaluateConfig, SelectConfig, TrainConfig


def _run_id(command: str, config: BaseModel) -> str:
    """The id the command's flow gives the run (flows: run_recorded's flow name and sources)."""
    from gradsift.flows.runs import run_id_for

    if isinstance(config, AnalyzeConfig):
        flow, sources = f"analyze-{'pairs' if config.pairs else 'fast_slow'}", [DataSource(path=config.data)]
    elif isinstance(config, TrainConfig):
        flow, sources = command, [config.data]
    elif isinstance(config, EvaluateConfig):
        flow, sources = command, [config.eval_data]
    elif isinstance(config, SelectConfig):
        flow, sources = command, []
    else:
        flow, sources = command, config.ingest.sources
    return run_id_for(flow, config, sources)


@pytest.fixture
def files(tmp_path):
    names = ["a.jsonl", "b.jsonl", "target.jsonl", "train.tsv", "test.tsv", "pairs.jsonl", "gsm8k.jsonl"]
    for name in names:
        (tmp_path / name).write_text('{"text": "hello", "label": "pos"}\n')
    return {name.split(".")[0]: str(tmp_path / name) for name in names} | {"dir": tmp_path}


def _cases(f):
    """(command, argv of flags, TOML text, extra argv with --config, the Python config) per run-making command."""
    d, store = f["dir"], str(f["dir"] / "store")
    two = [{"path": f["a"], "text": "body", "label": "y"}, {"path": f["b"], "text": "body", "label": "y"}]
    ingest_toml = (
        'store = "store"\n[model]\nname_or_path = "clf"\nmax_tokens = 64\nlabels = ["neg", "pos"]\n[ingest]\nshard_size = 8\n'
        'on_bad_file = "fail"\nsources = [{path = "a.jsonl", text = "body", label = "y"}, '
        '{path = "b.jsonl", text = "body", label = "y"}]\n'
    )
    ingest_flags = [f["a"], f["b"], "--store", store, "--text-field", "body", "--label-field", "y", "--shard-size", "8",
                    "--on-bad-file", "fail", "--max-tokens", "64", "--labels", "neg,pos", "--model", "clf"]  # fmt: skip
    ingest = {"store": store, "model": {"name_or_path": "clf", "max_tokens": 64, "labels": ["neg", "pos"]},
              "ingest": {"sources": two, "shard_size": 8, "on_bad_file": "fail"}}  # fmt: skip
    score = ingest | {"score": {"engine": {"feature_dim": 64, "nuclear_modules": ["q_proj", "v_proj"]}},
                      "ray": {"num_actors": 1}, "seed": 3}  # fmt: skip
    score_toml = ingest_toml + '[score.engine]\nfeature_dim = 64\nnuclear_modules = ["q_proj", "v_proj"]\n'
    score_toml = "seed = 3\n" + score_toml + "[ray]\nnum_actors = 1\n"
    score_flags = [*ingest_flags, "--feature-dim", "64", "--nuclear-modules", "q_proj", "--nuclear-modules", "v_proj",
                   "--num-actors", "1", "--seed", "3"]  # fmt: skip

    pool = [{"path": f["a"], "dataset": "pool"}, {"path": f["target"], "dataset": "tgt"}]
    base_toml = (
        '[ingest]\nsources = [{path = "a.jsonl", dataset = "pool"}, {path = "target.jsonl", dataset = "tgt"}]\n'
        '[target]\nname = "math"\ndatasets = ["tgt"]\n'
    )
    (d / "base.toml").write_text(base_toml + "[mixture]\n")
    nightly = {"store": store, "schedule": "30 3 * * *", "ingest": {"sources": pool}, "ray": {"num_actors": 1},
               "score": {"engine": {"feature_dim": 64}}, "target": {"name": "math", "datasets": ["tgt"]},
               "mixture": {}, "report": {"enabled": False}}  # fmt: skip
    nightly_toml = (
        'store = "store"\nschedule = "30 3 * * *"\n' + base_toml + "[mixture]\n[ray]\nnum_actors = 1\n"
        "[score.engine]\nfeature_dim = 64\n[report]\nenabled = false\n"
    )
    nightly_flags = ["--config", str(d / "base.toml"), "--store", store, "--schedule", "30 3 * * *",
                     "--num-actors", "1", "--feature-dim", "64", "--no-report"]  # fmt: skip

    checkpoints = '[target.checkpoints]\ntrain_run = "train-abc"\nstore = "ckpts"\n'
    (d / "influence-base.toml").write_text(base_toml + 'methods = ["less", "tracin"]\n' + checkpoints)
    influence = {"store": store, "ingest": {"sources": pool}, "score": {"engine": {"micro_batch_size": 4}},
                 "target": {"name": "math", "datasets": ["tgt"], "methods": ["less", "tracin"],
                            "checkpoints": {"train_run": "train-abc", "store": str(d / "ckpts")}},
                 "report": {"top_n": 3}}  # fmt: skip
    influence_toml = (
        'store = "store"\n[score.engine]\nmicro_batch_size = 4\n[report]\ntop_n = 3\n'
        + base_toml
        + 'methods = ["less", "tracin"]\n'
        + checkpoints
    )
    influence_flags = ["--config", str(d / "influence-base.toml"), "--store", store, "--micro-batch-size", "4",
                       "--report-top-n", "3"]  # fmt: skip

    train = {"store": store, "data": {"path": f["train"], "columns": ["text", "label"]}, "model": "tiny",
             "mode": "frozen", "epochs": 4, "lr": 0.01, "head_hidden": 16, "score_epoch": 2, "seeds": [0, 1],
             "gradient_scores": False, "ray": {"num_actors": 1}}  # fmt: skip
    train_toml = (
        'store = "store"\nmodel = "tiny"\nmode = "frozen"\nepochs = 4\nlr = 0.01\nhead_hidden = 16\nscore_epoch = 2\n'
        'seeds = [0, 1]\ngradient_scores = false\n[data]\npath = "train.tsv"\ncolumns = ["text", "label"]\n'
        "[ray]\nnum_actors = 1\n"
    )
    train_flags = [f["train"], "--store", store, "--model", "tiny", "--mode", "frozen", "--epochs", "4", "--lr", "0.01",
                   "--head-hidden", "16", "--score-epoch", "2", "--seeds", "0,1", "--columns", "text,label",
                   "--no-gradient-scores", "--num-actors", "1"]  # fmt: skip

    select = {"store": store, "scores_run": "train-x", "score": "aum", "fractions": [0.5, 0.25], "drop": "hard",
              "seeds": [0, 1], "manifest": False}  # fmt: skip
    select_toml = (
        'store = "store"\nscores_run = "train-x"\nscore = "aum"\nfractions = [0.5, 0.25]\ndrop = "hard"\n'
        "seeds = [0, 1]\nmanifest = false\n"
    )
    select_flags = ["--store", store, "--scores-run", "train-x", "--score", "aum", "--fractions", "0.5,0.25",
                    "--drop", "hard", "--seeds", "0", "--seeds", "1", "--no-manifest"]  # fmt: skip

    evaluate = {"store": store, "train_run": "train-x", "selection_runs": ["select-a", "select-b"],
                "eval_data": {"path": f["test"], "columns": ["text", "label"]}, "seeds": [0], "budget": "steps",
                "include_full": False, "plot": str(d / "plot.png")}  # fmt: skip
    evaluate_toml = (
        'store = "store"\ntrain_run = "train-x"\nselection_runs = ["select-a", "select-b"]\nseeds = [0]\n'
        'budget = "steps"\ninclude_full = false\nplot = "plot.png"\n[eval_data]\npath = "test.tsv"\n'
        'columns = ["text", "label"]\n'
    )
    evaluate_flags = [f["test"], "--store", store, "--train-run", "train-x", "--selection-run", "select-a",
                      "--selection-run", "select-b", "--seeds", "0", "--budget", "steps", "--no-include-full",
                      "--plot", str(d / "plot.png"), "--columns", "text,label"]  # fmt: skip

    pairs = {"store": store, "data": f["pairs"], "model": {"max_tokens": 64},
             "score": {"engine": {"micro_batch_size": 4}}, "pairs": {"layout": "hh", "limit": 8, "exact": False}}  # fmt: skip
    pairs_toml = (
        'store = "store"\ndata = "pairs.jsonl"\n[model]\nmax_tokens = 64\n[score.engine]\nmicro_batch_size = 4\n'
        '[pairs]\nlayout = "hh"\nlimit = 8\nexact = false\n'
    )
    pairs_flags = ["pairs", f["pairs"], "--store", store, "--max-tokens", "64", "--micro-batch-size", "4",
                   "--layout", "hh", "--limit", "8", "--no-exact"]  # fmt: skip
    fast = {"store": store, "data": f["gsm8k"], "fast_slow": {"limit": 16, "modules": ["q_proj", "o_proj"],
            "question": "q"}}  # fmt: skip
    fast_toml = 'store = "store"\ndata = "gsm8k.jsonl"\n[fast_slow]\nlimit = 16\nmodules = ["q_proj", "o_proj"]\n'
    fast_toml += 'question = "q"\n'
    fast_flags = ["fast-slow", f["gsm8k"], "--store", store, "--limit", "16", "--modules", "q_proj,o_proj",
                  "--question-field", "q"]  # fmt: skip
    return {
        "ingest": ("ingest", ingest_flags, ingest_toml, [], RunConfig(**ingest)),
        "score": ("score", score_flags, score_toml, [], RunConfig(**score)),
        "nightly": ("nightly", nightly_flags, nightly_toml, [], NightlyConfig(**nightly)),
        "influence": ("influence", influence_flags, influence_toml, [], NightlyConfig(**influence)),
        "train": ("train", train_flags, train_toml, [], TrainConfig(**train)),
        "select": ("select", select_flags, select_toml, [], SelectConfig(**select)),
        "evaluate": ("evaluate", evaluate_flags, evaluate_toml, [], EvaluateConfig(**evaluate)),
        "analyze-pairs": ("analyze", pairs_flags, pairs_toml, ["pairs"], AnalyzeConfig(**pairs)),
        "analyze-fast-slow": ("analyze", fast_flags, fast_toml, ["fast-slow"], AnalyzeConfig(**fast)),
    }


CASES = ["ingest", "score", "nightly", "influence", "train", "select", "evaluate", "analyze-pairs", "analyze-fast-slow"]


@pytest.mark.parametrize("case", CASES)
def test_flags_toml_and_python_make_the_same_run(case, files):
    command, flags, toml, toml_args, python = _cases(files)[case]
    path = files["dir"] / f"{case}.toml"
    path.write_text(toml)
    _, from_flags = build_config([command, *flags])
    _, from_toml = build_config([command, *toml_args, "--config", str(path)])
    loaded = type(python).from_toml(path)
    for config in (from_flags, from_toml, loaded):
        assert type(config) is type(python)
        assert config.model_dump() == python.model_dump()
    run_ids = {_run_id(command, c) for c in (from_flags, from_toml, loaded, python)}
    assert len(run_ids) == 1, run_ids
    assert run_ids.pop().startswith(f"{command}-" if command != "analyze" else "analyze-")


def test_no_option_given_is_the_model_default(files):
    """One default per option: the command line adds nothing the user did not give."""
    assert build_config(["ingest", files["a"]])[1] == RunConfig(ingest={"sources": [{"path": files["a"]}]})
    assert build_config(["score", files["a"]])[1] == RunConfig(ingest={"sources": [{"path": files["a"]}]})
    assert build_config(["train", files["train"]])[1] == TrainConfig(data={"path": files["train"]})
    assert build_config(["select", "--scores-run", "r"])[1] == SelectConfig(scores_run="r")
    evaluate = EvaluateConfig(train_run="t", selection_runs=["s"], eval_data={"path": files["test"]})
    assert build_config(["evaluate", files["test"], "--train-run", "t", "--selection-run", "s"])[1] == evaluate
    assert build_config(["analyze", "pairs", files["pairs"]])[1] == AnalyzeConfig(data=files["pairs"], pairs={})
    fast = AnalyzeConfig(data=files["gsm8k"], fast_slow={})
    assert build_config(["analyze", "fast-slow", files["gsm8k"]])[1] == fast


def test_toml_then_flags_override_it(files):
    path = files["dir"] / "train.toml"
    path.write_text('epochs = 5\nlr = 0.5\n[data]\npath = "train.tsv"\ntext = "body"\n')
    _, config = build_config(["train", "--config", str(path), "--lr", "0.1", "--label-field", "y"])
    assert config == TrainConfig(data={"path": files["train"], "text": "body", "label": "y"}, epochs=5, lr=0.1)


def test_bad_command_lines_name_the_option(files):
    with pytest.raises(ConfigError, match=r"scores_run \(--scores-run\): Field required"):
        build_config(["select"])
    with pytest.raises(ConfigError, match="--layout applies to pairs only"):
        build_config(["analyze", "fast-slow", files["gsm8k"], "--layout", "hh"])
    with pytest.raises(ConfigError, match=r"max_tokens \(--max-tokens\): Input should be greater than or equal to 8"):
        build_config(["score", files["a"], "--max-tokens", "2"])
    with pytest.raises(ConfigError, match="no input files"):
        build_config(["score"])
    with pytest.raises(ConfigError, match="nope.toml: No such file"):
        build_config(["nightly", "--config", str(files["dir"] / "nope.toml")])


def _literal_choices(tp) -> list[str]:
    tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if typing.get_origin(tp) else tp
    return [str(v) for v in typing.get_args(tp)] if typing.get_origin(tp) is typing.Literal else []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_field_with_its_description_and_choices(command):
    out = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert out.exit_code == 0, out.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out.output).split())
    for option in COMMANDS[command].options:
        assert option.flag in text, option.flag
        assert " ".join(option.help.split())[:40] in text, (option.flag, option.help)
        if choices := _literal_choices(option.type):
            assert "|".join(choices) in text, (option.flag, choices)


def test_help_of_the_real_program():
    env = {**os.environ, "COLUMNS": "250"}
    top = subprocess.run([GRADSIFT, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert top.returncode == 0, top.stderr
    for command in ["demo", "ingest", "score", "nightly", "train", "select", "evaluate", "analyze", "query", "status"]:
        assert re.search(rf"│ {command}\s", top.stdout), command
    train = subprocess.run([GRADSIFT, "train", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert train.returncode == 0, train.stderr
    lines: dict[str, str] = {}  # option -> its row, wrapped lines joined
    flag = None
    for line in train.stdout.splitlines():
        if line.startswith("│ --"):
            flag = line.split()[1]
        elif not line.startswith("│ "):
            flag = None
        if flag:
            lines[flag] = lines.get(flag, "") + " " + " ".join(line.strip("│ ").split())
    for name in ("epochs", "lr", "mode", "model", "head_hidden", "score_epoch", "batch_size"):
        default = TrainConfig.model_fields[name].default
        assert f"[default: {default}]" in lines["--" + name.replace("_", "-")], (name, default)
    assert "[default: 0]" in lines["--seeds"]
    assert "<finetune|frozen>" in lines["--mode"] and "<classification|causal_lm>" in lines["--task"]
    assert TrainConfig.model_fields["epochs"].description in lines["--epochs"]
