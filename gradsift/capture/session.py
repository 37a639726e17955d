"""A capture session: the hooks on the training model plus the streamed record of one rank.

``capture`` is the plain-PyTorch entry point (the HF Trainer one is gradsift/capture/trainer.py)::

    with capture(model, "store", "my-run") as rec:
        for step, batch in enumerate(loader, 1):
            out = model(**batch)            # labels in the batch; ids in it (SampleIdCollator) or given below
            out.loss.backward()
            rec.step(batch_ids, out, step=step)   # after the backward of every micro-batch
            optimizer.step(); optimizer.zero_grad()

DDP: each process records the samples of its own rank (its DistributedSampler shard) into parts named by the
rank (a ``DistributedDataParallel`` model is hooked through its ``module``; the output gradients the hooks see
are the rank's own, before DDP averages the weight gradients); the samples DistributedSampler repeats to even out the shards are dropped when scoring
(``scores.record_visits``: one visit per sample and epoch, the lowest rank's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from gradsift.capture.hooks import StepCapture
from gradsift.capture.ids import MISSING_HINT, MissingSampleIdsError
from gradsift.capture.record import VisitRecord
from gradsift.schemas.capture import CaptureConfig
from gradsift.schemas.engine import EngineConfig
from gradsift.storage.store import Store


def capture_run_id(run_name: str) -> str:
    """The store run id of a captured run: ``capture-<run_name>``."""
    return f"capture-{run_name}"


def data_parallel_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


class CaptureSession:
    """Hooks on ``model`` and the record of this rank under the store's staging of ``capture-<run_name>``."""

    def __init__(
        self, model: nn.Module, store: str, run_name: str, config: CaptureConfig | None = None, require_ids: bool = True
    ):
        compiled = getattr(model, "_compiled_call_impl", None) is not None  # model.compile(), in place
        if compiled or isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise NotImplementedError("gradsift capture needs the eager model's module hooks: capture the model "
                                      "before torch.compile, and train it uncompiled while capturing")  # fmt: skip
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # the hooks go on the wrapped model, which DDP calls with the same kwargs
        self.config = config or CaptureConfig(store=str(store))
        engine = EngineConfig(
            parameters=self.config.parameters,
            layer_stats=False,
            feature_dim=self.config.feature_dim,
            projection_seed=self.config.projection_seed,
        )
        self.store = Store(store).ensure()
        self.run_id = capture_run_id(run_name)
        self.hooks = StepCapture(model, engine, require_ids)
        self.record = VisitRecord(self.store.staging(self.run_id), run_name, data_parallel_rank())
        self.last_step = 0
        self._flushed_at = 0

    def resume(self, step: int) -> int:
        """Start (again) after optimiser step ``step`` (0: a fresh run): drop what was recorded after it."""
        self.last_step = self._flushed_at = step
        return self.record.truncate_after(step)

    def record_step(self, step: int, epoch: int, lr: float, ids: Sequence | None = None) -> int:
        """Record the micro-batches whose backward ran since the last call as visits of optimiser step ``step``;
        ``ids`` (sample ids, or (dataset, sample_id)) for a batch that carried none. Returns the visits."""
        visits = 0
        for res in self.hooks.collect():
            if ids is not None:
                res.ids = [tuple(i) if isinstance(i, (tuple, list)) else ("data", str(i)) for i in ids]
            if res.ids is None:
                raise MissingSampleIdsError("capture: a micro-batch without sample ids: pass batch_ids, or " + MISSING_HINT)
            self.record.add(res, step, epoch, lr)
            visits += len(res.ids)
        self.last_step = step
        if step - self._flushed_at >= self.config.flush_every:
            self.flush()
        return visits

    def flush(self) -> None:
        self.record.flush()
        self._flushed_at = self.last_step

    def close(self) -> None:
        self.flush()
        self.hooks.close()


class PlainLoopRecorder:
    """What ``capture`` yields: ``step`` after each micro-batch's backward."""

    def __init__(self, session: CaptureSession):
        self.session = session
        self._auto_step = session.last_step

    def step(self, batch_ids: Sequence | None = None, outputs=None, step: int | None = None, epoch: int = 1,
             lr: float = 0.0) -> int:  # fmt: skip
        """Record the micro-batch just backpropagated. ``step``: its optimiser step (default: one more than the
        last call's, so pass it with gradient accumulation); ``outputs`` is accepted for symmetry and unused (the
        hooks saw the logits). Returns the visits recorded."""
        self._auto_step = self._auto_step + 1 if step is None else step
        return self.session.record_step(self._auto_step, epoch, lr, batch_ids)


@contextmanager
def capture(
    model: nn.Module, store: str, run_name: str, config: CaptureConfig | None = None, resume_step: int = 0
) -> Iterator[PlainLoopRecorder]:
    """Record per-sample visits of a plain PyTorch training loop (see the module docstring); ``resume_step``: the
    optimiser step the loop resumes after (its record is cut back to it)."""
    session = CaptureSession(model, store, run_name, config, require_ids=False)
    session.resume(resume_step)
    try:
        yield PlainLoopRecorder(session)
    finally:
        session.close()
