"""One writer per store: an advisory ``flock`` on ``<store>/.writer.lock`` that names its holder.

The kernel drops the lock when the holding process dies (even by SIGKILL), so a crashed run never
leaves a stale lock behind. Readers (``gradsift query``) never take it: they attach the lake read-only
(storage.catalog) and each statement reads one committed snapshot, so they are never blocked and never see a
half-committed run. (DuckLake would detect two writers' conflicting commits itself; gradsift wants the second
writer to wait or fail up front, naming the first, not to fail at its commit.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from gradsift.storage.store import Store, utc_now

LOCK_WAIT_ENV = "GRADSIFT_LOCK_WAIT"
"""Seconds a run waits for another run's lock before giving up (default 0: fail fast)."""


class StoreLocked(RuntimeError):
    """Another run holds the store's writer lock."""


def lock_wait_default() -> float:
    return float(os.environ.get(LOCK_WAIT_ENV, "0") or 0)


class StoreLock:
    """Exclusive writer lock of a store; use as a context manager.

    ``wait`` seconds: how long to wait for a holder to finish (0: fail at once); None reads
    ``GRADSIFT_LOCK_WAIT``.
    """

    def __init__(self, store: Store, run_id: str, wait: float | None = None):
        self.path = store.root / ".writer.lock"
        self.run_id = run_id
        self.wait = lock_wait_default() if wait is None else wait
        self._fd: int | None = None

    def holder(self) -> dict | None:
        """Who holds (or last held) the lock, as written by the holder."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, json.JSONDecodeError):
            return None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLocked(self._locked_message()) from None
                time.sleep(0.5)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id, "since": utc_now().isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def _locked_message(self) -> str:
        holder = None
        for _ in range(10):  # the holder writes its name right after locking
            holder = self.holder()
            if holder:
                break
            time.sleep(0.05)
        who = (
            f"pid {holder['pid']} on {holder['host']}, run {holder['run_id']}, since {holder['since']}"
            if holder
            else "an unknown process"
        )
        waited = f" after waiting {self.wait:g}s" if self.wait else ""
        return (
            f"store {self.path.parent} is locked by another gradsift run ({who}){waited}. "
            f"Wait for it to finish, or set {LOCK_WAIT_ENV}=SECONDS to wait for it; "
            "`gradsift query` can read the store meanwhile."
        )

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def current_holder(store: Store) -> dict | None:
    """The live holder of a store's lock, or None when no run holds it (for `gradsift status`)."""
    lock = StoreLock(store, "", wait=0)
    if not lock.path.exists():
        return None
    fd = os.open(lock.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return lock.holder() or {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
