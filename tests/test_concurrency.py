"""One writer per store: a second run fails fast naming the lock holder (or waits); readers are never blocked."""

from __future__ import annotations

import subprocess
import time

import pytest
from live_services import GRADSIFT, SCORE_ARGS, gradsift_env, score_config, use_prefect_server, wait_for, write_rows

from gradsift.flows.score import score_flow
from gradsift.storage.catalog import query
from gradsift.storage.lock import StoreLock, StoreLocked, current_holder
from gradsift.storage.store import Store


def test_lock_names_its_holder_and_can_be_waited_for(tmp_path):
    store = Store(tmp_path / "store")
    holder = StoreLock(store, "score-aaa")
    holder.acquire()
    assert current_holder(store)["run_id"] == "score-aaa"
    start = time.monotonic()
    with pytest.raises(StoreLocked, match=r"locked by another gradsift run \(pid \d+ on .+, run score-aaa, since "):
        StoreLock(store, "score-bbb", wait=0.6).acquire()
    assert 0.5 < time.monotonic() - start < 5
    holder.release()
    assert current_holder(store) is None
    with StoreLock(store, "score-bbb", wait=0):
        assert current_holder(store)["run_id"] == "score-bbb"


def test_two_runs_at_once_one_wins_the_loser_names_the_lock(tmp_path, ray_local):
    files = [write_rows(tmp_path / f"{name}.jsonl", 48, name) for name in ("left", "right")]
    store = Store(tmp_path / "store")
    store.ensure()  # an empty lake, so readers can query from the start
    env = gradsift_env(tmp_path, ray_local)
    procs = [
        subprocess.Popen(
            [GRADSIFT, "score", str(f), "--store", str(store.root), *SCORE_ARGS],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for f in files
    ]
    seen: set[tuple[int, int]] = set()  # (samples, scores) a reader saw while the writer ran
    while any(p.poll() is None for p in procs):
        row = query(store, "SELECT (SELECT count(*) FROM samples) AS s, (SELECT count(*) FROM scores) AS c")
        seen.add(tuple(row.to_pylist()[0].values()))
        time.sleep(0.05)
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    message = " ".join(outputs[loser].split())
    assert f"locked by another gradsift run (pid {procs[winner].pid} on " in message, outputs[loser]
    assert seen <= {(0, 0), (48, 48)}, "a reader saw a half-committed run"

    [run] = store.runs()
    assert run["status"] == "completed" and not list(store.staging_root.iterdir())
    with use_prefect_server():  # the loser, run again, completes beside the winner's run
        score_flow(score_config(store.root, [files[loser]]))
    counts = query(store, "SELECT dataset, count(*) AS n, count(DISTINCT sample_id) AS ids FROM scores GROUP BY ALL")
    assert sorted(map(tuple, (r.values() for r in counts.to_pylist()))) == [("left", 48, 48), ("right", 48, 48)]
    wait_for(lambda: current_holder(store) is None, 5, "the lock to be free")
