"""A model folder's own code never runs, only safetensors weights load, and a bad folder fails fast
with gradsift's message: at the library level, and through `gradsift score` with stdin attached."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime

import pytest
import torch
from live_services import GRADSIFT, SCORE_ARGS, write_rows

from gradsift.models.folders import ModelFolderError, check_model_folder
from gradsift.models.loading import LlamaShape, build_llama, byte_tokenizer, head_of_folder, load_model, load_tokenizer

LOADERS = {
    "load_model": lambda path: load_model(str(path)),
    "load_tokenizer": lambda path: load_tokenizer(str(path)),
    "head_of_folder": lambda path: head_of_folder(str(path), None),
    "head_of_folder(num_labels)": lambda path: head_of_folder(str(path), 2),
}


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    build_llama(LlamaShape(hidden=16, layers=1, heads=2, intermediate=32)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def evil_copy(good, dest, config_name: str = "config.json"):
    """A copy of ``good`` whose ``config_name`` maps its classes to a .py that writes a marker when imported."""
    shutil.copytree(good, dest)
    marker = dest.parent / f"{dest.name}-code-ran"
    (dest / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((dest / config_name).read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
        "AutoTokenizer": ["modeling_evil.EvilTokenizer", None],
    }
    (dest / config_name).write_text(json.dumps(config))
    return dest, marker


def test_good_folder_loads(good_folder):
    model, tokenizer = load_model(str(good_folder))
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token == "<pad>"
    assert head_of_folder(str(good_folder), None) == ("causal_lm", None)


@pytest.mark.parametrize("config_name", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("loader", LOADERS)
def test_custom_code_is_refused_by_every_loader(good_folder, tmp_path, monkeypatch, loader, config_name):
    folder, marker = evil_copy(good_folder, tmp_path / "evil", config_name)
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("transformers was called before the folder check")

    for auto in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", never)
    with pytest.raises(ModelFolderError, match=rf"{config_name} asks for custom code \(auto_map: ") as info:
        LOADERS[loader](folder)
    assert "never runs a model folder's own code" in str(info.value)
    assert not marker.exists()


def test_transformers_itself_runs_no_folder_code_with_our_flags(good_folder, tmp_path):
    """Belt and braces, past our check: with trust_remote_code=False transformers uses its built-in class,
    or raises for a model type it lacks; it never prompts and never imports the folder's .py."""
    from transformers import AutoConfig

    folder, marker = evil_copy(good_folder, tmp_path / "evil")
    assert type(AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)).__name__ == (
        "LlamaConfig"
    )
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "evil"}))
    with pytest.raises(ValueError, match="custom code"):
        AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    assert not marker.exists()


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_folder_gets_gradsifts_message(tmp_path, loader):
    with pytest.raises(ModelFolderError, match="no such folder.*gradsift never downloads.*save_pretrained"):
        LOADERS[loader](tmp_path / "no-such-model")


def test_folder_without_config_or_weights(good_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="has no config.json.*never downloads"):
        check_model_folder(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFolderError, match="is not a folder"):
        check_model_folder(tmp_path / "file")
    folder = tmp_path / "no-weights"
    shutil.copytree(good_folder, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"no model weights \(\*.safetensors\)"):
        check_model_folder(folder)


@pytest.mark.parametrize("loader", LOADERS)
def test_pickle_only_folder_is_refused(tmp_path, loader):
    folder = tmp_path / "pickled"
    model = build_llama(LlamaShape(hidden=16, layers=1, heads=2, intermediate=32))
    model.config.save_pretrained(folder)  # transformers 5 saves safetensors only: the pickle file is written here
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    byte_tokenizer().save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    with pytest.raises(ModelFolderError, match="holds only pytorch_model.bin weights.*convert to safetensors"):
        LOADERS[loader](folder)


def test_encoder_and_adapter_folders_are_checked(good_folder, tmp_path):
    from gradsift.models.embeddings import embed_texts

    folder, marker = evil_copy(good_folder, tmp_path / "evil")
    with pytest.raises(ModelFolderError, match="auto_map"):
        embed_texts(str(folder), ["a text"])
    with pytest.raises(ModelFolderError, match="has no adapter_config.json"):
        check_model_folder(good_folder, config_name="adapter_config.json")
    assert not marker.exists()


def test_score_cli_refuses_custom_code_fast_without_prompt_or_traceback(good_folder, tmp_path):
    """`gradsift score` on a folder with auto_map, "y" waiting on stdin: exit 2, one message, no code, no retry."""
    folder, marker = evil_copy(good_folder, tmp_path / "evil")
    data = write_rows(tmp_path / "rows.jsonl", 12, "safety")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # an ephemeral server, as for most users
    env.update(GRADSIFT_STATE=str(tmp_path / "state"), COLUMNS="400")
    # --prefect: the flow, whose stages have retries (the refusal must not be retried)
    cmd = [GRADSIFT, "score", str(data), "--model", str(folder), "--store", str(tmp_path / "store"), *SCORE_ARGS]
    cmd.append("--prefect")
    proc = subprocess.run(cmd, input="y\ny\ny\n", capture_output=True, text=True, env=env, timeout=240)
    out = proc.stdout + proc.stderr
    flat = " ".join(out.split())
    assert proc.returncode == 2, out
    assert "error: " in flat and "config.json asks for custom code (auto_map:" in flat, out
    assert "never runs a model folder's own code" in flat
    assert "Traceback" not in out, out
    assert "[y/N]" not in out and "trust_remote_code" not in out, out
    assert "Retry" not in out and "AwaitingRetry" not in out, out
    assert not marker.exists()
    # flow time, from Prefect's log lines: the ingest stage fails at once (a retry alone would wait 2 s)
    stamps = {
        what: datetime.strptime(re.search(rf"^(\d\d:\d\d:\d\d\.\d+) .*{what}", out, re.M).group(1), "%H:%M:%S.%f")
        for what in ("Beginning flow run", "Flow run .* Finished in state Failed")
    }
    seconds = (stamps["Flow run .* Finished in state Failed"] - stamps["Beginning flow run"]).total_seconds()
    assert 0 <= seconds < 10, f"the flow took {seconds:.1f} s to fail"
