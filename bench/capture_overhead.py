"""Overhead of in-run capture (gradsift.capture.CaptureCallback) on the HF Trainer's training step.

The same Trainer run (same seed, same data order, same initial weights) without the callback, with it recording
gradient norms, and with it recording 8192-d projected features too; the three are interleaved in rounds so that
the machine's load hits them alike. Step time is the wall time between on_step_begin and on_step_end (the first
step of each run is warm-up and dropped). Models: the MiniLM classifier (batch 32 x 128 tokens) and the tiny
random Llama (batch 32 x 128 tokens). Goals: norms <= 1.10x, features <= 1.25x.

The process CPU time of each step is printed too: on a shared machine whose load exceeds its cores, wall time
mostly measures the other processes; with ``--threads 1`` the CPU time is the step's own work.

Usage: python bench/capture_overhead.py [--rounds 3] [--steps 6] [--models minilm tiny] [--device cpu|cuda]
    [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from gradsift.env import configure_environment

configure_environment()

MODES = {"off": None, "norms": 0, "features": 8192}


class StepTimer:
    """on_step_begin .. on_step_end wall and process CPU times (CUDA synchronised)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self.cpu, self._t, self._c = [], [], 0.0, 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._t, self._c = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._t)
                self.cpu.append(time.process_time() - self._c)

        return _Timer()


def build(model_name: str, n: int, length: int):
    """(model factory, features with sample ids, plain collator, id-carrying collator) for 'minilm' or 'tiny'."""
    from gradsift.capture import SampleIdCollator
    from gradsift.models.loading import build_llama, load_model, minilm_path

    g = torch.Generator().manual_seed(0)
    if model_name == "minilm":

        def make():
            return load_model(str(minilm_path()), num_labels=2, seed=0)[0].train()

        vocab, labels = 30000, lambda ids: int(ids[1] % 2)
    else:

        def make():
            return build_llama(seed=0).train()

        vocab, labels = 256, lambda ids: list(ids)
    feats = []
    for i in range(n):
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels(ids), "sample_id": f"s{i}"})

    def pad(features):
        return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}

    return make, feats, pad, SampleIdCollator(collator=pad)


def run_once(model_name, mode, steps, batch, length, device, store):
    from transformers import Trainer, TrainingArguments

    from gradsift.capture import CaptureCallback
    from gradsift.schemas.capture import CaptureConfig

    make, feats, plain, with_ids = build(model_name, steps * batch, length)
    collate = plain if MODES[mode] is None else with_ids  # without the callback nothing pops the ids
    timer = StepTimer()
    callbacks = [timer]
    if MODES[mode] is not None:
        cfg = CaptureConfig(store=store, feature_dim=MODES[mode], flush_every=1000)
        callbacks.insert(0, CaptureCallback(store, f"{model_name}-{mode}-{time.time_ns()}", cfg, score_at_end=False))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, seed=0, report_to=[],
        use_cpu=device == "cpu", remove_unused_columns=False, logging_strategy="no", save_strategy="no",
        disable_tqdm=True, learning_rate=1e-5,
    )  # fmt: skip
    Trainer(model=make(), args=args, train_dataset=feats, data_collator=collate, callbacks=callbacks).train()
    return timer.times[1:], timer.cpu[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=["minilm", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = tempfile.mkdtemp(prefix="gs-capture-bench-")
    for model_name in args.models:
        times: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                wall, used = run_once(model_name, mode, args.steps, args.batch, args.length, args.device, store)
                times[mode] += wall
                cpu[mode] += used
        for label, values in (("wall", times), ("cpu", cpu)):
            base = statistics.median(values["off"])
            line = f"{model_name} batch {args.batch}x{args.length} on {args.device}, {label}: off {base * 1e3:.0f} ms"
            for mode in ("norms", "features"):
                med = statistics.median(values[mode])
                line += f", {mode} {med * 1e3:.0f} ms ({med / base:.3f}x)"
            print(line + f" [median of {len(values['off'])} steps per mode, {args.rounds} interleaved rounds, "
                  f"{torch.get_num_threads()} threads]", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
