"""Run bookkeeping shared by every flow: run ids, the runs table, commit and catalog refresh."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

import gradsift
from gradsift.models.folders import model_fingerprint
from gradsift.schemas.config import DataSource
from gradsift.storage.catalog import REBUILD_HINT, build_catalog, catalog_problem, ensure_catalog
from gradsift.storage.check import Problem, run_problems
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
    """Writes a run's row as it starts, fails or completes; commits its staging folder.

    ``start`` takes the store's writer lock (storage.lock: fails fast, or waits GRADSIFT_LOCK_WAIT
    seconds, naming the holder) unless it is held already; ``complete``, ``fail`` and ``already_completed``
    release it.
    """

    def __init__(self, store: Store, run_id: str, flow: str, config: BaseModel, model: str, checkpoint: str):
        self.store = store.ensure()
        self.staging: RunStaging = store.staging(run_id)
        self.lock = StoreLock(self.store, run_id)
        self.broken: list[Problem] = []
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

    def completed_whole(self) -> dict | None:
        """This run's row if it completed and its committed parts are whole (storage.check: their footers read
        and they hold the rows it wrote), else None. A completed run with broken parts is redone: they are in
        ``broken``, and ``start`` restages the others."""
        prior = self.previous()
        if not prior or prior["status"] != "completed":
            return None
        self.broken = run_problems(self.store, self.run_id, prior)
        return None if self.broken else prior

    def start(self) -> None:
        if not self.lock.held:
            self.lock.acquire()
        prior = self.previous()
        self.row["started_at"] = prior["started_at"] if prior else utc_now()
        self.row["note"] = "resumed" if prior and prior["status"] != "completed" else None
        if self.broken:
            run_logger().warning(
                "run %s completed, but %d of its committed parts are broken (%s): redoing it, recomputing those",
                self.run_id,
                len(self.broken),
                "; ".join(map(str, self.broken)),
            )
            self.staging.remove()  # what a crash after the run row said completed left (else a no-op)
            self.staging.restage_committed([p.path for p in self.broken])
            self.row["note"] = f"repaired: {len(self.broken)} broken parts recomputed"
        self.store.write_run({**self.row, "status": "running"})

    def fail(self, err: BaseException) -> None:
        """Record the run failed (not one that ``complete`` recorded completed before its catalog rebuild failed)."""
        if not self.completed:
            self.store.write_run({**self.row, "status": "failed", "finished_at": utc_now(), "note": repr(err)[:2000]})
        self.lock.release()

    def complete(self, result: dict | None = None) -> int:
        """Commit the staged run (tables and artifacts), record it completed, rebuild the catalog.

        The staging folder, with its ``committing`` marker, is removed only once the run row says completed,
        so a crash anywhere in between is finished by the next run of this id (``run_recorded``); a crash
        before the catalog is rebuilt, by the next run of this id too (``already_completed``)."""
        rows = self.staging.commit(result, remove=False)
        parameter_set = (result or {}).get("parameter_set")
        self.row["parameter_set"] = json.dumps(parameter_set) if parameter_set else None
        self.store.write_run({**self.row, "status": "completed", "finished_at": utc_now(), "rows_written": rows})
        self.completed = True
        try:
            self.staging.remove()
            build_catalog(self.store)  # CatalogError over a broken part of any run: this one stays completed
        finally:
            self.lock.release()
        return rows

    def already_completed(self, prior: dict) -> dict:
        """Nothing to redo: this run completed (perhaps by another process while this one waited for the lock).

        Removes what a crash after its run row said completed left in staging and, holding the lock, rebuilds a
        catalog that is missing or not current (such a crash may also have come before the rebuild); releases
        the lock."""
        try:
            self.staging.remove()  # else a no-op
            if self.lock.held and (problem := ensure_catalog(self.store)):
                run_logger().info("catalog %s was %s: rebuilt it", self.store.catalog_path, problem)
        finally:
            self.lock.release()
        run_logger().info("run %s already completed with these inputs and config: nothing to do", self.run_id)
        return {
            "run_id": self.run_id,
            "status": "already completed",
            "store": str(self.store.root),
            "rows": prior["rows_written"],
        }

    def interrupted_commit(self) -> dict | None:
        """The result recorded by a commit of this run that began and did not finish, else None."""
        plan = self.staging.pending_commit()
        return None if plan is None else plan["result"] or {}


def run_recorded(
    flow: str, config: BaseModel, sources: list[DataSource], model: str, body: Callable, checkpoint: str = ""
) -> dict:
    """Run ``body(recorder) -> results`` as one recorded run, committed whole or marked failed.

    A completed run with this id (same flow, config, inputs, weights) is not redone, also when it completed in
    another process while this one waited for the writer lock; its catalog is rebuilt if it is not current. A
    completed run with broken parts is redone, recomputing those. One whose commit was cut short has that commit
    finished instead of its body rerun. A ``parameter_set`` in the results is recorded in ``runs``.
    """
    store = Store(config.store).ensure()
    run_id = run_id_for(flow, config, sources)
    recorder = RunRecorder(store, run_id, flow, config, model, checkpoint)
    done = recorder.completed_whole()
    if done is not None and (problem := catalog_problem(store)) is None:
        return recorder.already_completed(done)  # nothing to write: no lock needed
    try:
        recorder.lock.acquire()  # waits GRADSIFT_LOCK_WAIT s for another writer, maybe one running this command
    except StoreLocked:
        if done is None:
            raise
        run_logger().warning(  # that writer rebuilds the catalog as it completes
            "catalog %s is %s and another run holds the writer lock; %s",
            store.catalog_path,
            problem,
            REBUILD_HINT.format(root=store.root),
        )
        return recorder.already_completed(done)
    try:
        done = recorder.completed_whole()  # again, now that no other writer runs
        if done is not None:
            return recorder.already_completed(done)
        recorder.start()
    except BaseException:
        recorder.lock.release()
        raise
    try:
        result = recorder.interrupted_commit()
        if result is not None:  # everything was written and the commit began: finish it, redo nothing
            run_logger().info("run %s: finishing its interrupted commit", run_id)
        else:
            result = body(recorder)
        rows = recorder.complete(result)
    except BaseException as err:
        recorder.fail(err)
        raise
    return {"run_id": run_id, "status": "completed", "store": str(store.root), **result, "rows": rows}
