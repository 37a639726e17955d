"""Store growth over nightly runs, through the store path the flows use (docs/store.md).

``--samples`` samples (default 100k), then ``--nights`` nights (default 100), each adding ``--new`` (1%) new
samples. Each night is what a nightly run does to the store: every sample is staged again in shards (ingest reuse
reads them back), ``flows.incremental.reused_shards`` names the shards the lake already has scores of under the
run's scoring key, only the others are "scored" (staged), and ``RunStaging.commit`` writes the run in one lake
transaction (SQLite catalog, inlining off: ``Store``'s default), then merges the files of any table over
``LakeConfig.merge_over_files``. Queries go through ``storage.catalog.query`` as
``gradsift query`` does. Prints the README queries' times after night 1, after the last night, after ``store
compact`` and on a fresh store given the last night's rows in one night (what the data's growth alone costs), their
ratios, ``count(*) FROM scores`` against the distinct scored samples, and the store size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

QUERIES = {
    "count": "SELECT count(*) FROM scores",
    "join_group": (
        "SELECT domain, count(*) AS n, avg(loss) AS loss FROM scores JOIN samples USING (dataset, sample_id) "
        "GROUP BY domain ORDER BY domain"
    ),
    "latest_run": (
        "SELECT s.sample_id, loss FROM scores JOIN samples s USING (dataset, sample_id) WHERE domain = 'dom1' AND "
        "score_key = (SELECT score_key FROM runs WHERE status = 'completed' ORDER BY finished_at DESC LIMIT 1) "
        "ORDER BY loss DESC LIMIT 20"
    ),
}


def shards(start: int, n: int, size: int) -> list[tuple[str, pa.Table, pa.Table]]:
    """(shard name, samples, scores) of samples ``start`` .. ``start + n``, ``size`` per shard."""
    from gradsift.schemas.tables import SAMPLES, SCORES
    from gradsift.storage.keys import ShardKey

    out = []
    for index, lo in enumerate(range(start, start + n, size)):
        ids = [f"{i:016x}" for i in range(lo, min(lo + size, start + n))]
        name = ShardKey.of("web", index, ids).name
        rows = range(lo, lo + len(ids))
        samples = pa.table(
            {
                "dataset": ["web"] * len(ids),
                "sample_id": ids,
                "shard": [name] * len(ids),
                "domain": [f"dom{i % 8}" for i in rows],
                "text": [f"sample text {i} " * 8 for i in rows],
                "n_tokens": pa.array([64 + i % 100 for i in rows], pa.int32()),
                "line": pa.array(list(rows), pa.int64()),
            }
        )
        scores = pa.table(
            {
                "checkpoint": ["final"] * len(ids),
                "dataset": ["web"] * len(ids),
                "sample_id": ids,
                "loss": pa.array([(i % 1000) / 100 for i in rows], pa.float32()),
                "grad_norm": pa.array([(i % 777) / 10 for i in rows], pa.float32()),
            }
        )
        out.append((name, samples.cast(pa.schema([SAMPLES.field(c) for c in samples.column_names])),
                    scores.cast(pa.schema([SCORES.field(c) for c in scores.column_names]))))  # fmt: skip
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def night(store, run_id: str, total: int, shard_size: int) -> tuple[float, int, list[str]]:
    """One nightly run's store work, the file merge ``RunStaging.commit`` does included; (seconds, shards scored,
    tables merged)."""
    from gradsift.flows.incremental import reused_shards

    t0 = time.perf_counter()
    staging = store.staging(run_id)
    corpus = shards(0, total, shard_size)
    for name, samples, _ in corpus:
        staging.write_part("samples", name, samples)
    reused = set(reused_shards(store, staging, [name for name, _, _ in corpus], "k"))
    todo = [(name, scores) for name, _, scores in corpus if name not in reused]
    for name, scores in todo:
        staging.write_part("scores", name, scores)
    staging.set_score_key("k")
    staging.commit({"run_id": run_id, "flow": "nightly", "status": "completed"})
    staging.finish()
    return time.perf_counter() - t0, len(todo), staging.merged


def measure(store, label: str, seconds: float, scored: int, repeats: int) -> dict:
    from gradsift.storage.catalog import query

    res = {"night": label, "commit_s": seconds, "shards_scored": scored, "bytes": du(store.root)}
    for name, sql in QUERIES.items():
        res[f"{name}_s"] = timed(lambda sql=sql: query(store, sql), repeats)
    res["rows_counted"] = query(store, QUERIES["count"]).column(0)[0].as_py()
    res["distinct_scored"] = query(store, "SELECT count(DISTINCT sample_id) FROM scores").column(0)[0].as_py()
    return res


def run(root: Path, nights: int, base: int, new: int, shard_size: int, repeats: int) -> list[dict]:
    from gradsift.storage.store import Store

    store = Store(root).ensure()
    out, total, plain, merging = [], base, [], []
    for n in range(nights):
        total = base + n * new
        seconds, scored, merged = night(store, f"nightly-{n + 1:03d}", total, shard_size)
        (merging if merged else plain).append(seconds)
        if n in (0, nights - 1):
            out.append(measure(store, str(n + 1), seconds, scored, repeats))
    print(
        f"  nights that merged files: {len(merging)} (median {statistics.median(merging or [0]):.2f} s), the others "
        f"median {statistics.median(plain or [0]):.2f} s; merge_over_files = {store.config.merge_over_files}"
    )
    t0 = time.perf_counter()
    with store.lake() as lake:
        lake.compact()
    out.append(measure(store, f"{nights} compacted", time.perf_counter() - t0, 0, repeats))
    fresh = Store(root / "fresh").ensure()  # the same rows in one night: what the data's size alone costs
    seconds, scored, _ = night(fresh, "fresh-001", total, shard_size)
    out.append(measure(fresh, f"1 of {total}", seconds, scored, repeats))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--nights", type=int, default=100)
    ap.add_argument("--new", type=float, default=0.01, help="new samples per night, fraction of --samples")
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    new = int(args.samples * args.new)
    print(f"duckdb {duckdb.__version__}; {args.samples} samples, {args.nights} nights, {new} new per night")
    root = Path(tempfile.mkdtemp(prefix="store-growth-"))
    try:
        results = run(root, args.nights, args.samples, new, args.shard_size, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("  night          commit_s  shards  count_s  join_group_s  latest_run_s  rows_counted  distinct    MB")
    for m in results:
        print(
            f"  {m['night']:13s}  {m['commit_s']:8.2f}  {m['shards_scored']:6d}  {m['count_s']:7.4f}  "
            f"{m['join_group_s']:12.4f}  {m['latest_run_s']:12.4f}  {m['rows_counted']:12d}  {m['distinct_scored']:8d}  "
            f"{m['bytes'] / 1e6:5.2f}"
        )
    first, last, compacted, fresh = results
    ratios = {q: last[f"{q}_s"] / first[f"{q}_s"] for q in QUERIES}
    print(
        "  last/first (as the nightly commit leaves it): "
        + ", ".join(f"{q} x{r:.2f}" for q, r in ratios.items())
        + f", bytes x{last['bytes'] / first['bytes']:.2f}, rows x{last['rows_counted'] / first['rows_counted']:.2f}"
    )
    print(
        "  after a manual store compact/first: "
        + ", ".join(f"{q} x{compacted[f'{q}_s'] / first[f'{q}_s']:.2f}" for q in QUERIES)
    )
    print(
        "  last/one night of the same rows (the nights' cost apart from the data's growth): "
        + ", ".join(f"{q} x{last[f'{q}_s'] / fresh[f'{q}_s']:.2f}" for q in QUERIES)
        + f", bytes x{last['bytes'] / fresh['bytes']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
