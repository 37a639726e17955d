"""Wall time of the small commands, each a fresh `gradsift` process as a user runs it (issue 16: seconds of
work take seconds). Builds a hand-made store of N samples with a completed train run's scores (no model), then
times `status`, `query` and `select` on it, and `score` of 100 rows with the tiny model unless --no-score.

    python bench/startup.py [--samples 10000] [--no-score]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from gradsift.schemas.tables import SAMPLES, SCORES
from gradsift.storage.store import Store

TRAIN_RUN = "train-bench"
GOALS = {"status": 2.0, "query": 2.0, "select": 5.0, "score": 30.0}


def train_store(root: Path, n: int) -> Store:
    """A store holding one completed train run's samples and el2n scores, written as that flow writes them."""
    store = Store(root).ensure()
    staging = store.staging(TRAIN_RUN)
    ids = [f"s{i:06d}" for i in range(n)]
    samples = [
        {
            "dataset": "d",
            "sample_id": s,
            "label": "pos" if i % 2 else "neg",
            "text": f"text {i}",
            "record": json.dumps({"text": f"text {i}", "n": i}),
        }
        for i, s in enumerate(ids)
    ]
    staging.write_part("samples", "d-00000-0123456789", pa.Table.from_pylist(samples, schema=SAMPLES))
    scores = [
        {"checkpoint": "final", "dataset": "d", "sample_id": s, "el2n": float(i % 97), "never_learned": False}
        for i, s in enumerate(ids)
    ]
    staging.write_part("scores", "train", pa.Table.from_pylist(scores, schema=SCORES))
    staging.commit({"run_id": TRAIN_RUN, "flow": "train", "status": "completed"})
    staging.finish()
    return store


def timed(args: list[str], cwd: Path) -> float:
    """Seconds one ``gradsift ARGS`` process takes, start to exit (it must succeed)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gradsift.cli", *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"gradsift {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--no-score", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_store(work / "store", args.samples)
        commands = {
            "status": ["status", "--store", "store"],
            "query": ["query", "SELECT count(*) FROM scores", "--store", "store"],
            "select": [
                "select",
                "--store",
                "store",
                "--scores-run",
                TRAIN_RUN,
                "--score",
                "el2n",
                "--drop",
                "hard",
                "--fractions",
                "0.5",
                "--stratify",
                "none",
            ],
        }
        if not args.no_score:
            (work / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 8}) + "\n" for i in range(100)))
            commands["score"] = ["score", "rows.jsonl", "--store", "store", "--model", "tiny"]
        seconds = {name: timed(argv, work) for name, argv in commands.items()}
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cores, {args.samples} samples")
    print("| command | wall s | goal s |\n|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {GOALS[name]:.0f} |")
    print(json.dumps({"load_1m": round(load[0], 2), **{k: round(v, 2) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
