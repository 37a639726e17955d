"""Run bookkeeping shared by every flow: run ids, the runs table, the writer lock and the commit."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

import gradsift
from gradsift.models.folders import model_fingerprint
from gradsift.schemas.config import DataSource
from gradsift.storage.lock import StoreLock, StoreLocked
from gradsift.storage.store import RunStaging, Store, utc_now


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task, else the ``gradsift`` logger (code called outside a run, or by a
    command that runs without Prefect: then prefect is not even imported)."""
    if "prefect" not in sys.modules:
        return logging.getLogger("gradsift")
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("gradsift")


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    root = Path(gradsift.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{gradsift.__version__}+{sha}" if sha else gradsift.__version__


def file_digest(path: str) -> str:
    """Content hash of an input file; a path that cannot be read hashes its error (ingest reports it)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        return f"unreadable:{type(err).__name__}:{err.strerror}"
    return h.hexdigest()


def run_id_for(flow: str, config: BaseModel, sources: list[DataSource]) -> str:
    """Deterministic run id: the same command on the same inputs resumes the same run.

    Where the work runs (Ray address, actors) and where it is stored do not change the id; new
    weights in the same model folder do.
    """
    payload = config.model_dump(mode="json", exclude={"ray", "store"})
    payload["inputs"] = [file_digest(s.path) for s in sources]
    model = getattr(config, "model", None)
    if isinstance(name := getattr(model, "name_or_path", model), str):
        payload["model_fingerprint"] = model_fingerprint(name)
    payload["code"] = gradsift.__version__
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"{flow}-{digest}"


class RunRecorder:
    """A run's bookkeeping: its writer lock, its ``runs`` row and the commit of its staging folder.

    ``start`` takes the store's writer lock (storage.lock: fails fast, or waits GRADSIFT_LOCK_WAIT
    seconds, naming the holder) unless it is held already; ``complete``, ``fail`` and ``already_completed``
    release it. The ``runs`` row is written with the run's results in one lake transaction (``complete``), or
    alone when the run fails (``fail``); a run in progress has none (``gradsift status`` shows the lock holder).
    """

    STARTED = "_run"
    """The stage marker with the first attempt's start time (a resumed run keeps it) and the flow."""

    def __init__(self, store: Store, run_id: str, flow: str, config: BaseModel, model: str, checkpoint: str):
        self.store = store.ensure()
        self.staging: RunStaging = store.staging(run_id)
        self.lock = StoreLock(self.store, run_id)
        self.completed = False
        self.row = {
            "run_id": run_id,
            "flow": flow,
            "config": config.model_dump_json(),
            "model": model,
            "checkpoint": checkpoint,
            "code_version": code_version(),
        }

    @property
    def run_id(self) -> str:
        return self.row["run_id"]

    def previous(self) -> dict | None:
        return self.store.read_run(self.run_id)

    def completed_row(self) -> dict | None:
        """This run's ``runs`` row if it completed (its results are in the lake, committed with it), else None."""
        prior = self.previous()
        return prior if prior and prior["status"] == "completed" else None

    def start(self) -> None:
        if not self.lock.held:
            self.lock.acquire()
        started = self.staging.stage_info(self.STARTED)
        if started is None:
            started = {"started_at": utc_now().isoformat(), "flow": self.row["flow"]}
            self.staging.mark_done(self.STARTED, started)
        else:
            self.row["note"] = "resumed"
        self.row["started_at"] = datetime.fromisoformat(started["started_at"])

    def fail(self, err: BaseException) -> None:
        """Record the run failed: its ``runs`` row committed alone (its staged work stays, for the rerun)."""
        try:
            if not self.completed:
                row = {**self.row, "status": "failed", "finished_at": utc_now(), "note": repr(err)[:2000]}
                with self.store.lake() as lake:
                    lake.commit_run(self.run_id, {}, run=row)
        except Exception as problem:  # the run's own error is the one to raise
            run_logger().warning("could not record run %s as failed: %s", self.run_id, problem)
        finally:
            self.lock.release()

    def complete(self, result: dict | None = None) -> int:
        """Commit the staged run: its tables and its completed ``runs`` row in one lake transaction, then its
        artifacts moved into place; returns the rows written."""
        parameter_set = (result or {}).get("parameter_set")
        self.row["parameter_set"] = json.dumps(parameter_set) if parameter_set else None
        try:
            rows = self.staging.commit({**self.row, "status": "completed", "finished_at": utc_now()})
            self.completed = True
            if self.staging.merged:
                run_logger().info("run %s merged the data files of %s", self.run_id, ", ".join(self.staging.merged))
            self.staging.finish()
        finally:
            self.lock.release()
        return rows

    def already_completed(self, prior: dict) -> dict:
        """Nothing to redo: this run completed (perhaps by another process while this one waited for the lock).

        Holding the lock, it moves the artifacts a crash right after the commit left in staging; releases it."""
        try:
            if self.lock.held:
                self.staging.finish()  # else a no-op
        finally:
            self.lock.release()
        run_logger().info("run %s already completed with these inputs and config: nothing to do", self.run_id)
        return {
            "run_id": self.run_id,
            "status": "already completed",
            "store": str(self.store.root),
            "rows": prior["rows_written"],
        }


def run_recorded(
    flow: str, config: BaseModel, sources: list[DataSource], model: str, body: Callable, checkpoint: str = ""
) -> dict:
    """Run ``body(recorder) -> results`` as one recorded run, committed whole (one lake snapshot) or marked failed.

    A completed run with this id (same flow, config, inputs, weights) is not redone, also when it completed in
    another process while this one waited for the writer lock. A run that was cut short (killed, failed) is resumed
    from its staging folder: stages and parts already done are skipped. A ``parameter_set`` in the results is
    recorded in ``runs``.
    """
    store = Store(config.store).ensure()
    run_id = run_id_for(flow, config, sources)
    recorder = RunRecorder(store, run_id, flow, config, model, checkpoint)
    done = recorder.completed_row()
    if done is not None and not recorder.staging.dir.exists():
        return recorder.already_completed(done)  # nothing to write: no lock needed
    try:
        recorder.lock.acquire()  # waits GRADSIFT_LOCK_WAIT s for another writer, maybe one running this command
    except StoreLocked:
        if done is None:
            raise
        return recorder.already_completed(done)  # its artifacts are moved by the next run that gets the lock
    try:
        done = recorder.completed_row()  # again, now that no other writer runs
        if done is not None:
            return recorder.already_completed(done)
        recorder.start()
    except BaseException:
        recorder.lock.release()
        raise
    try:
        result = body(recorder)
        rows = recorder.complete(result)
    except BaseException as err:
        recorder.fail(err)
        raise
    return {"run_id": run_id, "status": "completed", "store": str(store.root), **result, "rows": rows}
