"""Which failures a Prefect task retries (only those a second try can fix), and which print no traceback.

A lost Ray worker, actor or node, and a transient I/O error, are retried; everything else (a bad model
folder, bad labels or config, a missing file, no permission, a full disk, a bug) fails at once, so the
user gets the message now rather than after every retry. A Ray task's error is judged by its cause.
"""

from __future__ import annotations

import errno
import logging

from gradsift.data.ingest import IngestError
from gradsift.models.folders import ModelFolderError
from gradsift.storage.lock import StoreLocked

# errno values of I/O errors that may pass: interrupted, busy, a flaky disk or network filesystem
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EINTR, errno.EIO, errno.ETIMEDOUT, errno.EBUSY, errno.ESTALE})
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def root_cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised, through any ``RayTaskError`` wrapping (nested tasks too)."""
    from ray.exceptions import RayTaskError

    for _ in range(10):
        if not (isinstance(err, RayTaskError) and isinstance(err.cause, BaseException)):
            break
        err = err.cause
    return err


def is_transient(err: BaseException) -> bool:
    """True when a retry of the same work can succeed."""
    from ray import exceptions as rx

    err = root_cause(err)
    if isinstance(err, rx.RayActorError):
        return not err.actor_init_failed  # an actor whose __init__ raised will raise again
    if isinstance(err, rx.WorkerCrashedError | rx.NodeDiedError | rx.ObjectLostError | rx.LocalRayletDiedError):
        return True
    if isinstance(err, rx.RayTaskError):  # a cause that could not be unwrapped (unpicklable): judged permanent
        return False
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    return isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only when its exception is transient.

    Prefect 3 calls it as ``fn(task, task_run, state)`` with the Failed state, whose result (read without
    raising) is the exception the task raised.
    """
    err = state.result(raise_on_failure=False)
    return isinstance(err, BaseException) and is_transient(err)


def is_user_error(err: BaseException) -> bool:
    """A failure its message explains whole (a bad model folder or input file, a locked store, a full disk)."""
    err = root_cause(err)
    if isinstance(err, ModelFolderError | IngestError | StoreLocked):
        return True
    return isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS


class _NoUserErrorTraceback(logging.Filter):
    """Prefect logs a failed flow run with its traceback; for a user error the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_user_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):  # on import: every process that runs our flows
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _NoUserErrorTraceback) for f in _logger.filters):
        _logger.addFilter(_NoUserErrorTraceback())
