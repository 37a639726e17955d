"""Store growth over nightly runs (prototype level, see docs/store.md).

10k samples, then N nights (default 30), each with 1% new samples; every night the whole corpus is "scored" again
(the same scoring key: unchanged rows). Compares

* ``parquet``: today's layout, simulated: each run's partition ``run_id=<id>/`` hard-links every earlier part and
  adds one part with the new rows; queried through ``storage.catalog.view_sql`` as ``gradsift query`` does;
* ``lake``: ``storage.lake`` with DuckLake's defaults (small inserts inlined in the catalog);
* ``lake-files``: ``storage.lake`` with inlining off (one Parquet file per table per night), then compacted;
* ``lake-sqlite``: ``storage.lake`` with the catalog in SQLite (readers in other processes while a writer works).
* ``lake-sqlite-files``: the catalog in SQLite, inlining off, then compacted (the recommended embedded default).

Prints query times after night 1 and after the last night, their ratio, the rows counted and the store size.
The lake rows need duckdb 1.5.5 with the ducklake extension, ``PYTHONPATH=.duck:. python bench/store_growth.py
--only lake --only lake-files --only lake-sqlite``; the parquet rows go through today's ``catalog.connect_readonly``
(any duckdb since its ATTACH quotes the path).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

QUERIES = {
    "count": "SELECT count(*) FROM scores",
    "join_group": (
        "SELECT domain, count(*) AS n, avg(loss) AS loss FROM scores JOIN samples USING (dataset, sample_id) "
        "GROUP BY domain ORDER BY domain"
    ),
}


def corpus(start: int, n: int) -> tuple[pa.Table, pa.Table]:
    ids = [f"{i:016x}" for i in range(start, start + n)]
    samples = pa.table(
        {
            "dataset": ["web"] * n,
            "sample_id": ids,
            "domain": [f"dom{i % 8}" for i in range(start, start + n)],
            "text": [f"sample text {i} " * 8 for i in range(start, start + n)],
            "n_tokens": pa.array([64 + i % 100 for i in range(start, start + n)], pa.int32()),
        }
    )
    scores = pa.table(
        {
            "checkpoint": ["final"] * n,
            "dataset": ["web"] * n,
            "sample_id": ids,
            "loss": pa.array([(i % 1000) / 100 for i in range(start, start + n)], pa.float32()),
            "grad_norm": pa.array([(i % 777) / 10 for i in range(start, start + n)], pa.float32()),
            "el2n": pa.array([(i % 333) / 333 for i in range(start, start + n)], pa.float32()),
        }
    )
    return samples, scores


def du(path: Path) -> int:
    seen: set[int] = set()
    total = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- today's Parquet layout (simulated) ------------------------------------------------------------------------------
def parquet_nights(root: Path, nights: int, base: int, new_per_night: int, repeats: int) -> dict:
    from gradsift.schemas.tables import RUNS
    from gradsift.storage.catalog import build_catalog, connect_readonly
    from gradsift.storage.store import Store

    store = Store(root)
    store.ensure()
    parts: dict[str, list[Path]] = {"samples": [], "scores": []}
    out: dict = {"nights": []}
    total = base
    for night in range(nights):
        run_id = f"2026-12-{night + 1:02d}-nightly"
        t0 = time.perf_counter()
        start, n = (0, base) if night == 0 else (total, new_per_night)
        if night:
            total += new_per_night
        samples, scores = corpus(start, n)
        for table, data in (("samples", samples), ("scores", scores)):
            folder = store.tables / table / f"run_id={run_id}"
            folder.mkdir(parents=True)
            for i, old in enumerate(parts[table]):  # what incremental reuse does: hard-link every earlier part
                os.link(old, folder / f"reused-{i:04d}.parquet")
            new = folder / f"part-{night:04d}.parquet"
            pq.write_table(data, new)
            parts[table].append(new)
        run = {f.name: None for f in RUNS}
        run.update(run_id=run_id, flow="nightly", status="completed")
        store.run_path(run_id).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([run], schema=RUNS), store.run_path(run_id))
        if night == 0:
            build_catalog(store)
        commit_s = time.perf_counter() - t0
        if night in (0, nights - 1):
            out["nights"].append(measure(lambda: connect_readonly(store), night + 1, commit_s, du(root), repeats))
    return out


# -- the lake prototype --------------------------------------------------------------------------------------------
def lake_nights(
    root: Path, nights: int, base: int, new_per_night: int, repeats: int, inline: bool, catalog: str = "duckdb"
) -> dict:
    from gradsift.storage.lake import Lake
    from gradsift.storage.lake_query import connect_readonly

    lake = Lake(root, catalog, inline_rows=None if inline else 0).open()
    out: dict = {"nights": []}
    total = base
    try:
        for night in range(nights):
            run_id = f"2026-12-{night + 1:02d}-nightly"
            if night:
                total += new_per_night
            samples, scores = corpus(0, total)  # every night scores the whole corpus again: the same key
            t0 = time.perf_counter()
            lake.commit_run(run_id, {"samples": samples, "scores": scores}, run={"status": "completed"}, score_key="k")
            commit_s = time.perf_counter() - t0
            if night in (0, nights - 1):
                lake.close()  # a DuckDB-file catalog: readers wait for the writer to detach
                out["nights"].append(
                    measure(lambda: connect_readonly(root, catalog), night + 1, commit_s, du(root), repeats)
                )
                lake.open()
        if not inline:
            t0 = time.perf_counter()
            lake.compact(older_than="0 seconds")
            compact_s = time.perf_counter() - t0
            lake.close()
            m = measure(lambda: connect_readonly(root, catalog), nights, compact_s, du(root), repeats)
            m["after"] = "compact + expire"
            out["nights"].append(m)
    finally:
        lake.close()
    return out


def measure(connect, night: int, commit_s: float, size: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    con = connect()
    attach_s = time.perf_counter() - t0
    try:
        res = {"night": night, "commit_s": commit_s, "attach_s": attach_s, "bytes": size}
        for name, sql in QUERIES.items():
            res[f"{name}_s"] = timed(lambda sql=sql: con.execute(sql).fetchall(), repeats)
        res["rows_counted"] = con.execute(QUERIES["count"]).fetchone()[0]
        res["join_rows"] = sum(r[1] for r in con.execute(QUERIES["join_group"]).fetchall())
    finally:
        con.close()
    return res


def report(name: str, out: dict) -> None:
    first, last = out["nights"][0], out["nights"][1]
    print(f"\n{name}")
    print("  night  commit_s  attach_s   count_s  join_group_s  rows_counted  join_rows     MB")
    for m in out["nights"]:
        tag = f" ({m['after']})" if "after" in m else ""
        print(
            f"  {m['night']:5d}  {m['commit_s']:8.3f}  {m['attach_s']:8.3f}  {m['count_s']:8.4f}  {m['join_group_s']:12.4f}"
            f"  {m['rows_counted']:12d}  {m['join_rows']:9d}  {m['bytes'] / 1e6:5.2f}{tag}"
        )
    print(
        f"  last/first: count x{last['count_s'] / first['count_s']:.1f}, join_group x"
        f"{last['join_group_s'] / first['join_group_s']:.1f}, size x{last['bytes'] / first['bytes']:.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--nights", type=int, default=30)
    ap.add_argument("--new", type=float, default=0.01, help="new samples per night, fraction of --samples")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["parquet", "lake", "lake-files", "lake-sqlite", "lake-sqlite-files"], action="append")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    new = int(args.samples * args.new)
    print(f"duckdb {duckdb.__version__}; {args.samples} samples, {args.nights} nights, {new} new per night")
    results = {}
    for name in args.only or ["parquet", "lake", "lake-files"]:
        root = Path(tempfile.mkdtemp(prefix=f"store-growth-{name}-"))
        try:
            if name == "parquet":
                results[name] = parquet_nights(root, args.nights, args.samples, new, args.repeats)
            else:
                catalog = "sqlite" if name.startswith("lake-sqlite") else "duckdb"
                inline = not name.endswith("-files")
                results[name] = lake_nights(root, args.nights, args.samples, new, args.repeats, inline, catalog)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        report(name, results[name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
