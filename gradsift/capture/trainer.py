"""``CaptureCallback``: in-run capture for the Hugging Face Trainer (gradsift/capture/session.py does the work).

    trainer = Trainer(model, TrainingArguments(..., remove_unused_columns=False), train_dataset=ds,
                      data_collator=SampleIdCollator(tokenizer=tok), callbacks=[CaptureCallback("store", "run")])

Gradient accumulation: every micro-batch is recorded (``on_substep_end`` / ``on_step_end``) as a visit of the
optimiser step it belongs to. Resume (``trainer.train(resume_from_checkpoint=...)``): the record is cut back to
the checkpoint's step before training goes on, so the steps trained again are recorded once. DDP: each rank
records its own samples (session.py). ``torch.compile`` (``TrainingArguments(torch_compile=True)``) is refused:
the hooks need the eager modules. At the end, world process zero scores the record (``score_at_end``).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from gradsift.capture.session import CaptureSession
from gradsift.schemas.capture import CaptureConfig, FromRunConfig


class CaptureCallback(TrainerCallback):
    """Records per-sample loss, prediction, margin, EL2N, gradient norm (and features) of every training visit."""

    def __init__(self, store: str, run_name: str, config: CaptureConfig | None = None, score_at_end: bool = True):
        self.store, self.run_name, self.score_at_end = str(store), run_name, score_at_end
        self.config = config or CaptureConfig(store=self.store)
        self.session: CaptureSession | None = None
        self._epoch, self._lr = 1, 0.0
        self.result: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.torch_compile:
            raise NotImplementedError(
                "gradsift capture needs the eager model's module hooks: train without torch_compile while capturing"
            )
        if getattr(args, "gradient_checkpointing", False):
            raise NotImplementedError("gradsift capture: gradient checkpointing runs modules twice per step")
        self.session = CaptureSession(model, self.store, self.run_name, self.config)
        self.session.resume(state.global_step)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._epoch = int(state.epoch or 0) + 1
        self._lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else 0.0

    def on_substep_end(self, args, state, control, **kwargs):
        self.session.record_step(state.global_step + 1, self._epoch, self._lr)

    def on_step_end(self, args, state, control, **kwargs):
        self.session.record_step(state.global_step, self._epoch, self._lr)

    def on_save(self, args, state, control, **kwargs):
        self.session.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.session.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's record is written before it is scored
        if self.score_at_end and state.is_world_process_zero:
            from gradsift.capture.scores import score_captured_run

            run = FromRunConfig(store=self.store, run=self.run_name, score_epoch=self.config.score_epoch)
            self.result = score_captured_run(run)
