"""Model folders before any transformers call: what gradsift refuses to load, and a folder's identity.

Imports neither torch nor transformers (run bookkeeping uses the fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class ModelFolderError(ValueError):
    """A model folder gradsift refuses to load: missing, not a model, asking for its own code, or pickle weights."""


CUSTOM_CODE_FIELDS = ("auto_map", "custom_pipelines")  # keys by which a folder asks transformers to import its .py
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "adapter_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")
# Every from_pretrained of a checked folder's weights: local files, no code from the folder, safetensors only, and
# no hub kernels (transformers 5.25+ turns them on by default: code fetched from the hub).
SAFE_LOAD = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True, "use_kernels": False}
HOW_TO_SAVE = "model.save_pretrained(FOLDER, safe_serialization=True) and tokenizer.save_pretrained(FOLDER) make one"


def _custom_code(data: object) -> tuple[str, object] | None:
    """The first custom-code field anywhere in a parsed config (sub-configs too), with its value."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in CUSTOM_CODE_FIELDS and value:
                return key, value
            if found := _custom_code(value):
                return found
    elif isinstance(data, list):
        for value in data:
            if found := _custom_code(value):
                return found
    return None


def check_model_folder(name_or_path: str | Path, config_name: str = "config.json") -> Path:
    """The folder, checked before any transformers (or peft) call; raises ``ModelFolderError``.

    It must be a local folder with ``config_name`` (``adapter_config.json`` for a LoRA adapter); none of its
    configs may ask for the folder's own code (``auto_map``: transformers would import a .py from it); its
    weights must be safetensors (pickle weights can run code when loaded). gradsift never downloads.
    """
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelFolderError(
            f"model {str(name_or_path)!r}: no such folder ({path.absolute()}); gradsift never downloads models: "
            f"pass 'tiny' or a local Hugging Face model folder ({HOW_TO_SAVE})"
        )
    if not path.is_dir() or not (path / config_name).is_file():
        what = "is not a folder" if not path.is_dir() else f"has no {config_name}"
        raise ModelFolderError(
            f"model {str(name_or_path)!r} {what}: not a Hugging Face model folder; gradsift never downloads "
            f"models: {HOW_TO_SAVE}"
        )
    for name in CODE_CONFIGS:
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ModelFolderError(f"{file} is not a readable JSON file: {err}") from None
        if found := _custom_code(data):
            field, value = found
            shown = json.dumps(value)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            raise ModelFolderError(
                f"{file} asks for custom code ({field}: {shown}): gradsift never runs a model folder's own code; "
                f"remove {field} or convert the model to a built-in transformers class"
            )
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelFolderError(
                f"{path} holds only {', '.join(pickles)} weights: gradsift loads only safetensors (pickle files can "
                "run code when loaded); convert to safetensors once, where you trust the file: "
                "e.g. AutoModelForCausalLM.from_pretrained(FOLDER).save_pretrained(FOLDER, safe_serialization=True)"
            )
        raise ModelFolderError(f"{path} has no model weights (*.safetensors): {HOW_TO_SAVE}")
    return path


def model_fingerprint(name_or_path: str) -> str:
    """Identity of a model's weights for run ids and result reuse: a folder retrained in place is a new model.

    Hashes each file's name, size and modification time (cheap for multi-GB weights) and the content of
    the small JSON configs; a name that is no folder (``tiny``, ``minilm``) is its own identity.
    """
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return name_or_path
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if path.suffix == ".json" and stat.st_size < 1 << 20:
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
