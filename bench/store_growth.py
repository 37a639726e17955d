"""Store growth over nightly runs, through the store path the flows use (docs/store.md), timed side by side.

``--samples`` samples (default 100k), then ``--nights`` nights (default 100), each adding ``--new`` (1%) new
samples. Each night is what a nightly run does to the store: every sample is staged again in shards (ingest reuse
reads them back), ``flows.incremental.unscored_shards`` names the shards the lake already has scores of under the
run's scoring key, only the others are "scored" (staged), and ``RunStaging.commit`` writes the run in one lake
transaction (SQLite catalog, inlining off: ``Store``'s default), then merges the files of any table over
``LakeConfig.merge_over_files``.

Three stores are then timed interleaved (``--repeats`` rounds after ``--warmup`` discarded ones, the stores' order
rotating): night 1 (night 1 replayed into a store of its own), the store after the last night, and a store given
the last night's rows in one night (what the data's growth alone costs). Each README query three ways: ``fresh``, a
new locked-down reader per query as a ``gradsift query`` process opens one (extensions, attach, views) and the
statement; ``statement``, that statement alone; ``query``, ``storage.catalog.query`` (the statement check, then the
statement on the process's shared reader). Prints medians with 25th-75th percentiles, ratios paired per round,
``count(*) FROM scores`` against the distinct scored samples, store sizes and data files; ``--explain`` adds EXPLAIN
ANALYZE of the join and latest-run queries, ``--compact`` a second round after ``store compact``.
"""

from __future__ import annotations

import argparse
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


FILES = (
    "SELECT table_name, file_count FROM ducklake_table_info('lake') WHERE table_name IN ('scores', 'samples', 'runs')"
)


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


def night(store, run_id: str, total: int, shard_size: int) -> tuple[float, int, list[str]]:
    """One nightly run's store work, the file merge ``RunStaging.commit`` does included; (seconds, shards scored,
    tables merged)."""
    from gradsift.flows.incremental import unscored_shards

    t0 = time.perf_counter()
    staging = store.staging(run_id)
    corpus = shards(0, total, shard_size)
    for name, samples, _ in corpus:
        staging.write_part("samples", name, samples)
    plan = unscored_shards(store, staging, [name for name, _, _ in corpus], "k")
    todo = [(name, scores) for name, _, scores in corpus if name not in plan.reused]
    for name, scores in todo:
        staging.write_part("scores", name, scores)
    staging.set_score_key("k")
    staging.commit({"run_id": run_id, "flow": "nightly", "status": "completed"})
    staging.finish()
    return time.perf_counter() - t0, len(todo), staging.merged


def fresh_connection(store, sql: str) -> tuple[float, float]:
    """(seconds of the whole, seconds of the statement): a new locked-down reader as a ``gradsift query`` process
    opens one (extensions loaded, lake attached READ_ONLY, views bound), the statement, close."""
    from gradsift.storage.store import _lake_instance

    t0 = time.perf_counter()
    con = _lake_instance(store.lake())
    try:
        t1 = time.perf_counter()
        con.execute(sql).to_arrow_table()
        t2 = time.perf_counter()
    finally:
        con.close()
    return time.perf_counter() - t0, t2 - t1


def through_query(store, sql: str) -> float:
    """Seconds of ``storage.catalog.query`` (what ``gradsift query`` runs: the statement check and the function
    denylist, then the statement in a worker thread, on the process's shared reader)."""
    from gradsift.storage.catalog import query

    t0 = time.perf_counter()
    query(store, sql)
    return time.perf_counter() - t0


def interleaved(stores: dict, repeats: int, warmup: int) -> dict:
    """Every (store, query, way) timed once per round, the stores' order rotating each round; ``warmup`` rounds
    discarded. Returns {(store, query, way): [seconds per kept round]}; ways: ``fresh`` (whole, new connection),
    ``statement`` (its statement alone), ``query`` (``catalog.query``)."""
    names = list(stores)
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for q, sql in QUERIES.items():
                whole, statement = fresh_connection(stores[name], sql)
                seen = {"fresh": whole, "statement": statement, "query": through_query(stores[name], sql)}
                if r >= warmup:
                    for way, t in seen.items():
                        times.setdefault((name, q, way), []).append(t)
    return times


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile)."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return statistics.median(values), q[0], q[2]


def counts(store) -> dict:
    from gradsift.storage.catalog import query

    return {
        "bytes": du(store.root),
        "rows_counted": query(store, QUERIES["count"]).column(0)[0].as_py(),
        "distinct_scored": query(store, "SELECT count(DISTINCT sample_id) FROM scores").column(0)[0].as_py(),
        "files": {r["table_name"]: r["file_count"] for r in query(store, FILES).to_pylist()},
    }


def report(times: dict, stores: list[str], base: str) -> None:
    """Medians [25th-75th] per store, query and way; then each store's paired ratios to ``base`` (per round)."""
    ways = ("fresh", "statement", "query")
    print("  store         query        " + "".join(f"{w + ' ms (p25-p75)':>26s}" for w in ways))
    for name in stores:
        for q in QUERIES:
            cells = []
            for w in ways:
                m, lo, hi = spread(times[(name, q, w)])
                cells.append(f"{m * 1e3:9.1f} ({lo * 1e3:6.1f}-{hi * 1e3:6.1f})")
            print(f"  {name:12s}  {q:11s}  " + "".join(f"{c:>26s}" for c in cells))
    for name in stores:
        if name == base:
            continue
        parts = []
        for q in QUERIES:
            for w in ways:
                paired = [a / b for a, b in zip(times[(name, q, w)], times[(base, q, w)], strict=True)]
                m, lo, hi = spread(paired)
                parts.append(f"{q}/{w} x{m:.2f} ({lo:.2f}-{hi:.2f})")
        print(f"  {name} / {base}, paired per round, median (p25-p75): " + ", ".join(parts))


def explain(stores: dict) -> None:
    """EXPLAIN ANALYZE of the join and latest-run queries on each store (a fresh reader each)."""
    from gradsift.storage.store import _lake_instance

    for name, store in stores.items():
        for q in ("join_group", "latest_run"):
            con = _lake_instance(store.lake())
            try:
                con.execute(QUERIES[q]).fetchall()  # warm
                plan = con.execute("EXPLAIN ANALYZE " + QUERIES[q]).fetchall()[0][1]
            finally:
                con.close()
            print(f"----- EXPLAIN ANALYZE {q} on {name}\n{plan}")


def run(root: Path, args, new: int) -> None:
    from gradsift.storage.store import LakeConfig, Store

    base, nights, size = args.samples, args.nights, args.shard_size
    if args.merge_over_files is not None:  # the grown store's LakeConfig (<store>/lake.json)
        (root / "grown").mkdir(parents=True)
        config = LakeConfig(merge_over_files=args.merge_over_files)
        (root / "grown" / Store.CONFIG).write_text(config.model_dump_json())
    grown, first = Store(root / "grown").ensure(), Store(root / "night1").ensure()
    # the night-1 store kept aside: night 1 replayed into a store of its own (a copy of the folder would keep the
    # catalog's absolute data path, i.e. read the grown store's files, which later merges replace)
    seconds, scored, _ = night(first, "nightly-001", base, size)
    plain, merging, total = [], [], base
    for n in range(nights):
        total = base + n * new
        s, k, merged = night(grown, f"nightly-{n + 1:03d}", total, size)
        (merging if merged else plain).append(s)
        if n == 0:
            night1 = (s, k)
        if n == nights - 1:
            last = (s, k)
    print(
        f"  night 1 {night1[0]:.2f} s ({night1[1]} shards scored); night {nights} {last[0]:.2f} s ({last[1]} scored); "
        f"nights that merged files: {len(merging)} (median {statistics.median(merging or [0]):.2f} s), the others "
        f"median {statistics.median(plain or [0]):.2f} s; merge_over_files = {grown.config.merge_over_files}"
    )
    fresh = Store(root / "fresh").ensure()  # the same rows in one night: what the data's size alone costs
    night(fresh, "fresh-001", total, size)
    stores = {"night1": first, f"night{nights}": grown, "one-night": fresh}
    for name, store in stores.items():
        c = counts(store)
        print(
            f"  {name:10s} rows counted {c['rows_counted']:8d}, distinct scored {c['distinct_scored']:8d}, "
            f"{c['bytes'] / 1e6:6.2f} MB, data files {c['files']}"
        )
    sizes = {name: du(s.root) for name, s in stores.items()}
    print(
        f"  bytes night{nights}/night1 x{sizes[f'night{nights}'] / sizes['night1']:.2f}, "
        f"night{nights}/one-night x{sizes[f'night{nights}'] / sizes['one-night']:.2f}, rows x{total / base:.2f}"
    )
    if args.explain:
        explain(stores)
    t0 = time.perf_counter()
    times = interleaved(stores, args.repeats, args.warmup)
    print(f"  interleaved: {args.repeats} rounds kept after {args.warmup} warm-up ({time.perf_counter() - t0:.0f} s)")
    report(times, list(stores), "night1")
    if args.compact:
        with grown.lake() as lake:
            lake.compact()
        compacted = {"night1": first, f"night{nights}-compacted": grown}
        report(interleaved(compacted, args.repeats, args.warmup), list(compacted), "night1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--nights", type=int, default=100)
    ap.add_argument("--new", type=float, default=0.01, help="new samples per night, fraction of --samples")
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds kept")
    ap.add_argument("--warmup", type=int, default=2, help="interleaved rounds discarded first")
    ap.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of the join and latest-run queries")
    ap.add_argument("--compact", action="store_true", help="then `store compact` the grown store and time it again")
    ap.add_argument("--merge-over-files", type=int, help="the grown store's LakeConfig.merge_over_files")
    ap.add_argument("--keep", type=Path, help="build the stores here and keep them (default: a temp folder, removed)")
    args = ap.parse_args()
    new = int(args.samples * args.new)
    print(f"duckdb {duckdb.__version__}; {args.samples} samples, {args.nights} nights, {new} new per night")
    root = args.keep or Path(tempfile.mkdtemp(prefix="store-growth-"))
    try:
        run(root, args, new)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
