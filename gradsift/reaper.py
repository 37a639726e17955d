"""Watchdog of the gradsift CLI: when the CLI process dies, by any means, what it started dies with it.

On its own Ray fate-shares only the processes ``ray.init`` starts directly (gcs_server, raylet, the
dashboard head, monitor, log monitor get PR_SET_PDEATHSIG) and its workers follow their raylet within
about 2 s; the raylet's dashboard and runtime-env agents outlive a SIGKILLed driver by about a minute,
and Prefect's temporary server (a uvicorn subprocess) for good.

``python -m gradsift.reaper PID`` runs in its own session, started by the CLI (PID) as its first act.
While PID runs it records PID's descendants; once PID is gone (a normal exit, a crash, SIGKILL) it sends
SIGTERM, then after a grace period SIGKILL, to those still running and to their own descendants, then
exits. It only signals processes it saw descend from PID, identified by pid and creation time so a
reused pid is never hit: a Ray cluster or Prefect server the CLI merely joined is not a descendant.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterable

import psutil

POLL_S = 0.5  # how often the CLI's descendants are recorded (and how late its death is seen)
GRACE_S = 3.0  # between SIGTERM and SIGKILL


def start() -> None:
    """Watch this process from a detached watchdog (its own session; no stdio, so no pipe is held open)."""
    subprocess.Popen(
        [sys.executable, "-m", "gradsift.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _running(proc: psutil.Process) -> bool:
    """Still the same process (pid and creation time) and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _with_descendants(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes still running and their running descendants, this watchdog excluded."""
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        if _running(proc):
            found[proc.pid] = proc
            found.update((child.pid, child) for child in _descendants(proc) if _running(child))
    found.pop(os.getpid(), None)
    return list(found.values())


def stop(procs: Iterable[psutil.Process]) -> None:
    """SIGTERM the processes still running and their descendants; SIGKILL what is left after GRACE_S."""
    targets = list(procs)
    for send in (psutil.Process.terminate, psutil.Process.kill):
        targets = _with_descendants(targets)
        for proc in targets:
            with contextlib.suppress(psutil.Error):  # psutil refuses to signal a pid now naming another process
                send(proc)
        deadline = time.monotonic() + GRACE_S
        while (targets := [p for p in targets if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)


def watch(pid: int) -> None:
    """Record the descendants of PID, this watchdog's parent, while it runs; stop them once it is gone."""
    try:
        cli = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    if os.getppid() != pid:  # the CLI died before this started: its descendants are unknown
        return
    seen: dict[int, psutil.Process] = {}
    while _running(cli):
        seen = {p.pid: p for p in seen.values() if _running(p)}  # kept even once out of the CLI's tree
        seen.update((p.pid, p) for p in _descendants(cli))
        time.sleep(POLL_S)
    stop(seen.values())


if __name__ == "__main__":
    watch(int(sys.argv[1]))
