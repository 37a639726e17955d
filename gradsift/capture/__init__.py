"""Capture per-sample training signals inside a user's own training run (HF Trainer or a plain PyTorch loop)."""

from gradsift.capture.ids import ID_KEY, MissingSampleIdsError, SampleIdCollator, samples_dataset, with_sample_ids
from gradsift.capture.scores import captured_scores, score_captured_run
from gradsift.capture.session import CaptureSession, capture, capture_run_id
from gradsift.capture.trainer import CaptureCallback

__all__ = [
    "ID_KEY",
    "CaptureCallback",
    "CaptureSession",
    "MissingSampleIdsError",
    "SampleIdCollator",
    "capture",
    "capture_run_id",
    "captured_scores",
    "samples_dataset",
    "score_captured_run",
    "with_sample_ids",
]
