"""Influence at scale: blocked streaming over float16 feature shards on Ray vs one in-memory numpy matmul.

Generates N x k float16 train features as Parquet shards in a staging folder (the layout the
influence stage reads), with their raw rows as the score stage writes them for influence
(``storage.feature_rows``; ``--no-rows``: Parquet only, decoded on read), and M x k targets; streams cosine
influence (subtask mean/max + top-k per target) over blocks the way the influence stage runs them without a
cluster: in this process on one thread, numpy's BLAS on every core (``--threads``: more block threads; ``--actors``:
on a pool of Ray actors, one per CPU, instead), and
times a single float32 numpy matmul of the same size (the floor). ``--cold`` evicts the features' files
from the page cache first, so that the blocks read them from disk.
Usage: .venv/bin/python bench/influence.py --n 200000 --k 8192 --m 1000 --block-rows 8192
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradsift.env import configure_environment

configure_environment()


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (written back first): the next reads come from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--m", type=int, default=1000)
    ap.add_argument("--shard", type=int, default=4096)
    ap.add_argument("--block-rows", type=int, default=8192)
    ap.add_argument("--cpus", type=int, default=None)
    ap.add_argument("--no-rows", action="store_true", help="write no raw feature rows (Parquet decoded on read)")
    ap.add_argument("--cold", action="store_true", help="evict the features' files from the page cache first")
    ap.add_argument("--repeats", type=int, default=1, help="streamed runs, each followed by a floor run")
    ap.add_argument("--actors", action="store_true", help="Ray actors (one per CPU) instead of the thread pool")
    ap.add_argument("--threads", type=int, default=1, help="block threads in this process (without --actors)")
    ap.add_argument("--no-ahead", action="store_true", help="read no block ahead (each block reads only its own rows)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")

    import ray

    from gradsift.executors.ray import pool_workers, run_on_pool
    from gradsift.executors.workers import InfluenceBlocks
    from gradsift.schemas.config import RayConfig
    from gradsift.schemas.tables import SAMPLES
    from gradsift.signals.influence import FeatureSource, block_items, group_shards, merge_blocks, read_targets
    from gradsift.signals.scoring import features_table
    from gradsift.storage.atomic import write_parquet_atomic
    from gradsift.storage.feature_rows import part_path, write_rows

    tmp = Path(tempfile.mkdtemp(prefix="gradsift-bench-influence-"))
    rng = np.random.default_rng(0)

    def write_shard(name: str, dataset: str, first: int, n: int) -> None:
        ids = [f"{dataset}{first + j}" for j in range(n)]
        samples = pa.Table.from_pylist(
            [{"dataset": dataset, "sample_id": s, "domain": "d"} for s in ids], schema=SAMPLES
        )
        write_parquet_atomic(samples, tmp / "samples" / f"{name}.parquet")
        feats = rng.standard_normal((n, args.k), dtype=np.float32).astype(np.float16)
        recs = [
            {"checkpoint": "c", "dataset": dataset, "sample_id": s, "feature": f}
            for s, f in zip(ids, feats, strict=True)
        ]
        table = features_table(recs, args.k)
        write_parquet_atomic(table, part_path(tmp, name))
        if not args.no_rows:
            write_rows(tmp, name, table)

    shards, rows = [], {}
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, args.n, args.shard)):
        name, n = f"train-{i:05d}-x", min(args.shard, args.n - start)
        write_shard(name, "train", start, n)
        shards.append(name)
        rows[name] = n
    write_shard("target-00000-x", "target", 0, args.m)
    print(f"generated {args.n} x {args.k} float16 features in {len(shards)} shards in {time.perf_counter() - t0:.1f}s")
    src = [FeatureSource("c", 1.0, {"grad": "c"})]
    targets = read_targets(tmp, ["target-00000-x"], src, ["target"])[0]

    if args.actors:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    blocks = group_shards(shards, rows, args.block_rows)
    pool = RayConfig(address=None, num_actors=args.cpus or os.cpu_count() or 1)
    threads = 0 if args.actors else args.threads
    n_workers, where = pool_workers(pool, len(blocks), threads=threads), "Ray actors" if args.actors else "threads"
    worker = (str(tmp), ["target-00000-x"], src, ["target"], ["cosine"], 10)
    items = block_items(blocks, n_workers)
    if args.no_ahead:
        items = [(i, b, []) for i, b, _ in items]

    def stream() -> float:
        if args.cold:
            evict([*(tmp / "features").glob("*.parquet"), *(tmp / "_scratch").rglob("*.npy")])
        t0 = time.perf_counter()
        done = run_on_pool(InfluenceBlocks, worker, items, pool, threads=threads)
        res = merge_blocks(sorted(done, key=lambda r: r["block"]), ["cosine"], 10, len(src))
        seconds = time.perf_counter() - t0
        peaks: dict[int, float] = {}
        for r in done:
            peaks[r["pid"]] = max(peaks.get(r["pid"], 0.0), r["peak_rss_mb"])
        busy = sum(r["seconds"] for r in done)
        print(
            f"streamed {len(res.scores['cosine'])} rows in {len(blocks)} blocks on {n_workers} {where}: {seconds:.1f}s"
        )
        print(
            "  peak RSS per process: "
            + ", ".join(f"{v:.0f} MiB" for v in sorted(peaks.values()))
            + f" (threads: this process, before the floor's input exists on the first run); seconds in blocks, summed: {busy:.1f}"
        )
        return seconds

    t = targets.feats[0].T.copy()
    floor_input: list[np.ndarray] = []  # the floor: one in-memory float32 matmul (made after the first stream)

    def floor() -> float:
        if not floor_input:
            floor_input.append(rng.standard_normal((args.n, args.k), dtype=np.float32))
        x = floor_input[0]
        t0 = time.perf_counter()
        dense = x @ t
        seconds = time.perf_counter() - t0
        print(
            f"numpy single matmul {args.n}x{args.k} @ {args.k}x{args.m} in memory: {seconds:.1f}s (output {dense.nbytes / 2**30:.2f} GiB, input {x.nbytes / 2**30:.2f} GiB)"
        )
        return seconds

    ratios = []
    for _ in range(args.repeats):  # interleaved, so that each ratio's two sides see the same load
        s_, f_ = stream(), floor()
        ratios.append(s_ / f_)
        print(f"ratio streamed / floor = {ratios[-1]:.2f}")
    if args.actors:
        ray.shutdown()
    print(
        "ratios: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"; best {min(ratios):.2f}, median {float(np.median(ratios)):.2f}"
    )
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
