"""Fine-tune MiniLM on SST-2 with the Hugging Face Trainer and gradsift's capture callback, then select and evaluate.

A subset of SST-2 train gets 10% of its labels flipped (planted noise). gradsift ingests it (as part of a proxy
``gradsift train`` run of the same model, data and optimiser, kept for comparison); the Trainer fine-tunes on those
ingested samples with ``CaptureCallback``, which records every visit and, at the end, writes the captured run's
scores (``capture-<name>``). The script prints the AUROC of AUM (and the other scores) ranking the flipped samples
first, for the captured run and the proxy run, then selects by the captured AUM and (``--evaluate``) retrains.

Usage (from the repo root): python examples/capture_sst2.py [--data ../shared/data/sst2] [--work /tmp/gs-capture]
    [--rows 5000] [--epochs 3] [--max-length 64] [--evaluate]

It prints the acceptance check: the AUM AUROC of both runs and their difference (goal <= 0.01).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gradsift.env import configure_environment

configure_environment()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ (the noisy-copy helpers)

SOURCE = {"columns": None, "text": "sentence"}


def aurocs(store, run_id: str, flipped: set[int]) -> dict[str, float]:
    """AUROC of each score of ``run_id`` ranking the flipped lines first (low AUM first)."""
    from gradsift.signals.dynamics import auroc
    from gradsift.storage.catalog import query

    sql = "SELECT m.line, s.* FROM scores s JOIN samples m USING (dataset, sample_id) WHERE s.run_id = $run"
    t = query(store, sql, {"run": run_id}).to_pandas()
    pos = t["line"].isin(flipped).to_numpy()
    oriented = {"aum (low first)": -t["aum"], "el2n": t["el2n"], "grand": t["grand"], "final loss": t["loss"],
                "forgetting": t["forgetting"] + 1000 * t["never_learned"], "self_influence": t["self_influence"]}  # fmt: skip
    return {k: round(auroc(np.asarray(v, float), pos), 4) for k, v in oriented.items() if v.notna().all()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/sst2"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/gradsift-capture-sst2"))
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per sentence (SST-2's are short; both runs)")
    ap.add_argument("--name", default="sst2-minilm")
    ap.add_argument("--no-proxy", action="store_true", help="ingest only (one proxy epoch is still needed to ingest)")
    ap.add_argument("--evaluate", action="store_true", help="retrain on the AUM selection and on all (slow)")
    args = ap.parse_args()

    from transformers import Trainer, TrainingArguments

    from bench.pruning import noisy_copy, subset_copy
    from gradsift.capture import CaptureCallback, SampleIdCollator, samples_dataset
    from gradsift.flows.select import select_flow
    from gradsift.flows.train import resolve_model, train
    from gradsift.models.loading import load_model
    from gradsift.schemas.train import SelectConfig, TrainConfig
    from gradsift.storage.catalog import query
    from gradsift.storage.store import Store

    args.work.mkdir(parents=True, exist_ok=True)
    store = str(args.work / "store")
    subset = subset_copy(args.data / "train.tsv", args.work / f"train{args.rows}.tsv", args.rows, True, 0)
    noisy = args.work / f"train{args.rows}-noisy10.tsv"
    flipped = noisy_copy(subset, noisy, 0.10, seed=0, label_col=1, header=True)
    common = {"store": store, "model": "minilm", "mode": "finetune", "batch_size": args.batch, "lr": args.lr,
              "max_length": args.max_length, "seeds": [0], "gradient_scores": False}  # fmt: skip
    t = time.perf_counter()
    proxy = train(TrainConfig(data={"path": str(noisy), **SOURCE}, epochs=1 if args.no_proxy else args.epochs,
                                   **common))  # fmt: skip
    proxy_s = time.perf_counter() - t
    sql = (
        "SELECT m.* FROM samples m JOIN (SELECT DISTINCT dataset, sample_id FROM dynamics WHERE run_id = $run) "
        "USING (dataset, sample_id) ORDER BY m.line"
    )
    rows = query(Store(store), sql, {"run": proxy["run_id"]}).to_pylist()
    # the ingest's class index (the labels found, sorted); a rerun of a completed proxy run does not return it
    label_index = proxy.get("label_index") or {label: i for i, label in enumerate(sorted({r["label"] for r in rows}))}
    model, tokenizer = load_model(resolve_model("minilm"), num_labels=len(label_index), seed=0)
    train_set = samples_dataset(rows, tokenizer, label_index, max_length=args.max_length)
    callback = CaptureCallback(store, args.name)
    targs = TrainingArguments(
        output_dir=str(args.work / "hf"), per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=0.0,
        seed=0, use_cpu=True, report_to=[], remove_unused_columns=False, save_strategy="epoch", logging_steps=50,
        disable_tqdm=True,
    )  # fmt: skip
    t = time.perf_counter()
    trainer = Trainer(model=model.train(), args=targs, train_dataset=train_set,
                      data_collator=SampleIdCollator(tokenizer=tokenizer), callbacks=[callback])  # fmt: skip
    trainer.train()
    hf_s = time.perf_counter() - t
    captured = callback.result["run_id"]
    print(
        f"\n{len(rows)} samples, {len(flipped)} flipped; HF Trainer + capture {hf_s:.0f} s, proxy run {proxy_s:.0f} s"
    )
    ours = aurocs(Store(store), captured, flipped)
    print(f"captured run {captured}: AUROC {ours}")
    if not args.no_proxy:
        theirs = aurocs(Store(store), proxy["run_id"], flipped)
        print(f"proxy run {proxy['run_id']}: AUROC {theirs}")
        a, b = ours["aum (low first)"], theirs["aum (low first)"]
        print(f"AUM AUROC captured {a:.4f}, proxy {b:.4f}, difference {abs(a - b):.4f} (goal <= 0.01)", flush=True)
    selection = select_flow(SelectConfig(store=store, scores_run=captured, score="aum", drop="hard", fractions=[0.9]))
    print(f"selection run {selection['run_id']}: {selection['selections']}")
    if args.evaluate:
        from gradsift.flows.evaluate import evaluate
        from gradsift.schemas.train import EvaluateConfig

        evaluation = evaluate(EvaluateConfig(store=store, train_run=proxy["run_id"], seeds=[0],
                                                  selection_runs=[selection["run_id"]],
                                                  eval_data={"path": str(args.data / "dev.tsv"), **SOURCE}))  # fmt: skip
        print(f"evaluation: {evaluation}")


if __name__ == "__main__":
    main()
