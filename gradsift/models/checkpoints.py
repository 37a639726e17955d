"""Training checkpoints: the on-disk format other stages (LESS influence, VoG, TracIn) read.

Layout: ``<store>/checkpoints/<train_run_id>/step-<NNNNNN>/`` holding

* ``model/``: ``save_pretrained`` output with safetensors (the tokenizer beside it); for LoRA the
  peft adapter folder (rebuild: ``meta["base_model"]`` + ``meta["num_labels"]`` + ``meta["base_seed"]``);
  in frozen-encoder mode ``head.safetensors`` (the head on top of ``meta["base_model"]``'s embeddings);
* ``optimizer.pt``: ``torch.save`` of the AdamW ``optimizer.state_dict()``;
* ``meta.json``: {"step", "epoch", "lr" (the learning rate used at that step), "base_model", "lora",
  "task", "label_index", "mode", "seed", ...}.

A train flow with several seeds writes one ``train_run_id`` per seed: ``<run_id>-seed<k>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradsift.models.embeddings import build_head
from gradsift.models.folders import check_model_folder
from gradsift.models.loading import load_model, load_tokenizer
from gradsift.storage.atomic import write_dir_atomic


@dataclass(frozen=True)
class CheckpointInfo:
    """Where one checkpoint lies and what its meta.json says."""

    path: Path
    train_run_id: str
    step: int
    epoch: int
    lr: float
    meta: dict


def checkpoint_root(store_root: str | Path, train_run_id: str) -> Path:
    return Path(store_root) / "checkpoints" / train_run_id


def save_checkpoint(
    store_root: str | Path, train_run_id: str, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer, meta: dict
) -> CheckpointInfo:
    """Write one checkpoint folder atomically (a hidden temp folder moved into place, ``storage.atomic``)."""
    final = checkpoint_root(store_root, train_run_id) / f"step-{meta['step']:06d}"

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        if meta.get("mode") == "frozen":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model" / "head.safetensors")
        else:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    write_dir_atomic(final, write)
    return _info(final)


def _info(path: Path) -> CheckpointInfo:
    meta = json.loads((path / "meta.json").read_text())
    return CheckpointInfo(path, path.parent.name, meta["step"], meta["epoch"], meta["lr"], meta)


def list_checkpoints(store_root: str | Path, train_run_id: str) -> list[CheckpointInfo]:
    """Checkpoints of a train run in step order. Given a train flow's run id rather than one seed's
    ``<run_id>-seed<k>``, returns every seed's checkpoints (seed, then step order)."""
    root = checkpoint_root(store_root, train_run_id)
    dirs = [root] if root.is_dir() else sorted(root.parent.glob(f"{train_run_id}-seed*"))
    infos = [_info(p) for d in dirs for p in d.glob("step-*") if not p.name.endswith(".tmp")]
    return sorted(infos, key=lambda c: (c.meta.get("seed", 0), c.step))


def load_checkpoint(info: CheckpointInfo) -> tuple[nn.Module, object, dict, dict]:
    """(model, tokenizer, optimizer_state, meta) of one checkpoint; the model is in eval mode.

    Frozen-encoder checkpoints give the head (input: mean-pooled embeddings of ``meta["base_model"]``).
    """
    return (*load_checkpoint_model(info), load_optimizer_state(info), info.meta)


def load_optimizer_state(info: CheckpointInfo) -> dict:
    """The AdamW ``state_dict`` saved with a checkpoint."""
    return torch.load(info.path / "optimizer.pt", map_location="cpu", weights_only=True)


def load_checkpoint_model(info: CheckpointInfo) -> tuple[nn.Module, object]:
    """(model, tokenizer) of one checkpoint, without its optimizer state; see ``load_checkpoint``."""
    meta = info.meta
    model_dir = info.path / "model"
    if meta.get("mode") == "frozen":
        from safetensors.torch import load_file

        model = build_head(meta["input_dim"], meta["num_labels"], meta.get("head_hidden", 0))
        model.load_state_dict(load_file(model_dir / "head.safetensors"))
        return model.eval(), load_tokenizer(meta["base_model"])
    if meta.get("lora"):
        from peft import PeftModel

        adapter = check_model_folder(model_dir, config_name="adapter_config.json")
        base, tokenizer = load_model(meta["base_model"], meta.get("num_labels"), seed=meta.get("base_seed", 0))
        model = PeftModel.from_pretrained(base, adapter, is_trainable=True, local_files_only=True)
        return model.eval(), tokenizer
    return load_model(str(model_dir), meta.get("num_labels"))
