"""Retries only for failures a second try can fix; a full disk or a Ray-wrapped error reads as its cause."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pyarrow as pa
import pytest
from prefect.states import Failed
from ray import exceptions as rx

from gradsift.flows.retry import _NoUserErrorTraceback, is_transient, retry_transient, root_cause
from gradsift.models.folders import ModelFolderError
from gradsift.storage.store import Store


def wrapped(cause: BaseException) -> BaseException:
    """What ``ray.get`` raises when a Ray task raised ``cause``: a RayTaskError that is also a ``type(cause)``."""
    return rx.RayTaskError("score_shard", "Traceback (most recent call last): ...", cause).as_instanceof_cause()


def decide(err: BaseException) -> bool:
    return retry_transient(None, None, Failed(data=err))


@pytest.mark.parametrize(
    "err",
    [
        rx.RayActorError(error_msg="the actor died"),
        rx.ActorUnavailableError("unavailable", None),
        rx.WorkerCrashedError(),
        rx.NodeDiedError("node gone"),
        rx.ObjectLostError("0" * 56, "", ""),
        ConnectionResetError(errno.ECONNRESET, "connection reset"),
        TimeoutError("timed out"),
        OSError(errno.EIO, "input/output error"),
        wrapped(OSError(errno.EAGAIN, "try again")),
        wrapped(ConnectionError("api went away")),
    ],
    ids=repr,
)
def test_transient_failures_are_retried(err):
    assert decide(err)


@pytest.mark.parametrize(
    "err",
    [
        ValueError("bad labels"),
        TypeError("bug"),
        KeyError("missing column"),
        ModelFolderError("config.json asks for custom code (auto_map: ...)"),
        FileNotFoundError(errno.ENOENT, "no such file", "data.jsonl"),
        PermissionError(errno.EACCES, "permission denied", "store"),
        OSError(errno.ENOSPC, "no space left on device", "store/x.parquet"),
        wrapped(ValueError("bad labels")),
        wrapped(ModelFolderError("no such folder")),
        wrapped(OSError(errno.ENOSPC, "no space left on device", "store/x.parquet")),
        rx.RayActorError(error_msg="died in __init__", actor_init_failed=True),
    ],
    ids=repr,
)
def test_permanent_failures_are_not_retried(err):
    assert not decide(err)


def test_wrapped_error_unwraps_to_its_cause():
    cause = OSError(errno.ENOSPC, "no space left on device", "/store/x.parquet")
    err = wrapped(cause)
    assert isinstance(err, rx.RayTaskError)
    assert str(err) != str(cause)  # what users saw before: RayTaskError(OSError)() and a remote traceback
    assert root_cause(err) is cause
    assert not is_transient(err)


def test_prefect_task_runs_once_on_a_permanent_error_and_retries_a_transient_one(prefect_harness):
    from prefect import flow, task

    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def stage(kind: str) -> str:
        calls.append(kind)
        if kind == "permanent":
            raise ModelFolderError("config.json asks for custom code")
        if len([c for c in calls if c == kind]) < 3:
            raise ConnectionError("lost the worker's connection")
        return "done"

    @flow
    def run(kind: str):
        return stage(kind)

    with pytest.raises(ModelFolderError):
        run("permanent")
    assert calls == ["permanent"]
    assert run("transient") == "done"
    assert calls.count("transient") == 3


def test_full_disk_write_names_the_path_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import gradsift.storage.store as store_mod

    def full(table, where, **kwargs):
        Path(where).write_bytes(b"partial")  # a half-written temp file
        raise OSError(errno.ENOSPC, "[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left")

    monkeypatch.setattr(store_mod.pq, "write_table", full)
    staging = Store(tmp_path / "store").ensure().staging("run-1")
    with pytest.raises(OSError) as info:
        staging.write_part("scores", "shard-0", pa.table({"x": [1]}))
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(staging.part_path("scores", "shard-0"))
    assert info.value.strerror == "no space left on device"
    assert list((staging.dir / "scores").iterdir()) == []


def test_cli_message_of_a_wrapped_full_disk_error():
    from gradsift.cli.errors import failure as _failure

    err = wrapped(OSError(errno.ENOSPC, "no space left on device", "/store/staging/r/scores/s.parquet"))
    cause, message = _failure(err)
    assert isinstance(cause, OSError)
    assert message == "/store/staging/r/scores/s.parquet: no space left on device"
    assert _failure(wrapped(ModelFolderError("no such folder")))[1] == "no such folder"


def test_user_error_logs_without_traceback():
    def record(err: BaseException) -> logging.LogRecord:
        try:
            raise err
        except BaseException as caught:
            return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed: %r", (caught,), None)

    def exc_info_of(err: BaseException):
        rec = record(err)
        rec.exc_info = (type(err), err, err.__traceback__)
        _NoUserErrorTraceback().filter(rec)
        return rec.exc_info

    assert exc_info_of(ModelFolderError("auto_map")) is None
    assert exc_info_of(wrapped(OSError(errno.ENOSPC, "no space left on device", "/x"))) is None
    assert exc_info_of(TypeError("a bug keeps its traceback")) is not None
