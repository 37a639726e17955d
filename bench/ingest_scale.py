"""Benchmark: streaming ingest's peak memory and throughput at 100k and 1M JSONL rows, against a floor.

Each measurement runs in a fresh subprocess (its own peak RSS, ``ru_maxrss``) and times the work alone
(not the start-up or the tokenizer load):

- ingest: ``IngestStream`` -> ``write_source`` into a store's staging and ``record_ingest`` (the ``ingests`` row and
  ``shard_members``), as the ingest stage runs them
  (data.ingest, data.shards), then ``RunStaging.commit`` into the store's DuckLake (samples, quarantine, ingests and
  shard_members in one transaction), without Prefect or Ray;
- floor: a plain loop that reads the same file line by line, ``json.loads`` each line and calls the same
  ``count_tokens`` on it, one row per tokenizer call: the issue's floor;
- batched floor: the same loop handing 256 parsed rows at a time to ``count_tokens_batch``, the call the ingest
  makes: what the ingest costs beyond reading, parsing and tokenizing as it tokenizes;
- whole-file (``--whole-file-rows``): ``ingest_source`` + ``shard_samples``, every sample of the file in memory
  as ingest held it before it streamed.

Two tokenizers: the tiny model's byte tokenizer on prompt/response rows (causal LM counts), and MiniLM's real
WordPiece tokenizer on text + label rows (classifier counts). About 3% of the rows are bad (cut JSON, a missing
field, an empty text, an exact duplicate, an id reused for other content). Floor and ingest runs alternate.
The ingest rows also give the peak RSS before the commit (``staged``) and the commit's seconds.
Prints a table, then (last line) one JSON object with ``rss_ratio_1m_over_100k`` (goal <= 1.2) and
``throughput_over_floor`` (goal >= 0.8, at the largest size) per tokenizer. Run from the repository root:

    PYTHONPATH=. python bench/ingest_scale.py                       # 100k and 1M rows, both tokenizers
    PYTHONPATH=. python bench/ingest_scale.py --rows 10000,100000 --tokenizers tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from gradsift.env import configure_environment

configure_environment()

TOKENIZERS = {"tiny": "causal_lm", "minilm": "classification"}
TOPICS = ["markets", "football", "elections", "chips", "weather", "science", "film", "travel"]


def _row(i: int, tokenizer: str) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    if tokenizer == "tiny":
        return {"id": i, "prompt": f"Question {i} about {topic}: what changed this week? ",
                "response": f"Report {i}: {topic} moved by {i % 97} points after a quiet start."}  # fmt: skip
    return {"id": i, "text": f"Story {i}: {topic} news, {i % 97} points up after a quiet start to the week.",
            "label": str(i % 4)}  # fmt: skip


def generate(path: Path, n: int, tokenizer: str) -> None:
    """``n`` JSONL rows; every 33rd from row 100 is bad in one of five ways (about 3%)."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            row = _row(i, tokenizer)
            kind = (i // 33) % 5 if i >= 100 and i % 33 == 0 else -1
            if kind == 0:
                fh.write('{"id": 1, "prompt": "cut\n')
                continue
            if kind == 1:
                row = {"id": i, "title": "no text field"}
            elif kind == 2:
                row["response" if tokenizer == "tiny" else "text"] = "   "
            elif kind == 3:
                row = {**_row(i - 50, tokenizer), "id": f"copy-{i}"}
            elif kind == 4:
                row["id"] = i - 50
            fh.write(json.dumps(row) + "\n")


def _tokenizer(name: str):
    from gradsift.models.loading import load_tokenizer, minilm_path

    return load_tokenizer("tiny" if name == "tiny" else str(minilm_path()))


def child(mode: str, path: str, tokenizer_name: str, workdir: str) -> dict:
    """One measurement, in this (fresh) process."""
    from gradsift.models.adapter import adapter

    tokenizer = _tokenizer(tokenizer_name)
    counter = adapter(TOKENIZERS[tokenizer_name])
    start = time.perf_counter()
    rows = samples = quarantined = 0
    staged_rss_mb = commit_seconds = None
    if mode == "floor":
        with open(path, "rb") as fh:
            for line in fh:
                rows += 1
                try:
                    rec = json.loads(line)
                    counter.count_tokens(tokenizer, rec.get("prompt"), rec.get("response"), rec.get("text") or "")
                except Exception:
                    quarantined += 1
        samples = rows - quarantined
    elif mode == "batched":  # the floor with the ingest's own batch count: 256 parsed rows per tokenizer call
        batch: list[tuple] = []
        with open(path, "rb") as fh:
            for line in fh:
                rows += 1
                try:
                    rec = json.loads(line)
                except ValueError:
                    quarantined += 1
                    continue
                batch.append((rec.get("prompt"), rec.get("response"), rec.get("text") or ""))
                if len(batch) == 256:
                    counter.count_tokens_batch(tokenizer, batch)
                    batch = []
        counter.count_tokens_batch(tokenizer, batch)
        samples = rows - quarantined
    else:
        from gradsift.data.ingest import IngestStream, LabelRule, ingest_source, shard_samples
        from gradsift.data.shards import write_source
        from gradsift.flows.incremental import record_ingest
        from gradsift.schemas.config import DataSource
        from gradsift.storage.store import Store

        source = DataSource(path=path)
        labels = LabelRule(required=True) if tokenizer_name == "minilm" else LabelRule()

        def n_tokens(prompt, response, text):
            return counter.count_tokens(tokenizer, prompt, response, text)

        def n_tokens_batch(batch):
            return counter.count_tokens_batch(tokenizer, batch)

        if mode == "ingest":
            staging = Store(workdir).ensure().staging("bench")
            stream = IngestStream(source, n_tokens, 512, labels, count_batch=n_tokens_batch)
            written = write_source(stream, source.name, staging, 256, "quarantine")
            entry = {"run_id": "bench", "dataset": written.dataset, "shards": written.shards,
                     "quarantine_part": "quarantine", "samples": written.samples,
                     "quarantined": written.quarantined, "labels": sorted(written.labels)}  # fmt: skip
            record_ingest(staging, "bench", entry)  # the ingests row and shard_members, as the ingest stage records
            samples, quarantined = written.samples, written.quarantined
            staged_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            commit_start = time.perf_counter()
            staging.commit({"run_id": "bench", "flow": "ingest", "status": "completed"})  # into the lake
            commit_seconds = time.perf_counter() - commit_start
        else:  # the whole file in memory, then shards
            result = ingest_source(source, n_tokens, 512, labels)
            shard_samples(result.samples, source.name, 256)
            samples, quarantined = len(result.samples), len(result.quarantine)
        rows = samples + quarantined
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "samples": samples, "quarantined": quarantined, "seconds": seconds, "rss_mb": rss_mb,
            "staged_rss_mb": staged_rss_mb, "commit_seconds": commit_seconds}  # fmt: skip


def run_child(mode: str, path: Path, tokenizer: str, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--file", str(path), "--tokenizers", tokenizer]
    cmd += ["--workdir", str(workdir)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} {tokenizer} {path.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="100000,1000000", help="sizes, comma-separated (the first and last are compared)")
    ap.add_argument("--tokenizers", default="tiny,minilm")
    ap.add_argument("--data", default="/tmp/gradsift-ingest-scale", help="where the generated files and stores go")
    ap.add_argument("--repeats", type=int, default=1, help="floor/ingest pairs per size (the fastest of each kept)")
    ap.add_argument("--whole-file-rows", type=int, default=100_000, help="also run the whole-file path at this size")
    ap.add_argument("--child", choices=["ingest", "floor", "batched", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.file, args.tokenizers, args.workdir)))
        return

    sizes = [int(s) for s in args.rows.split(",")]
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int, str], dict] = {}
    print(f"{'tokenizer':9} {'rows':>9} {'mode':7} {'rows/s':>9} {'peak RSS MB':>11} {'staged RSS':>10} "
          f"{'commit s':>8} {'samples':>9} {'quarantined':>11}")  # fmt: skip
    for tokenizer in args.tokenizers.split(","):
        for n in sizes:
            path = data / f"{tokenizer}-{n}.jsonl"
            if not path.exists():
                generate(path, n, tokenizer)
            modes = ["floor", "batched", "ingest"] * args.repeats + (["whole"] if n == args.whole_file_rows else [])
            for mode in modes:
                workdir = data / f"store-{tokenizer}-{n}-{mode}"
                subprocess.run(["rm", "-rf", str(workdir)], check=True)
                r = run_child(mode, path, tokenizer, workdir)
                r["rate"] = r["rows"] / r["seconds"]
                best = results.get((tokenizer, n, mode))
                results[(tokenizer, n, mode)] = r if best is None or r["rate"] > best["rate"] else best
                staged = "" if r["staged_rss_mb"] is None else f"{r['staged_rss_mb']:,.0f}"
                commit = "" if r["commit_seconds"] is None else f"{r['commit_seconds']:.1f}"
                print(f"{tokenizer:9} {n:>9,} {mode:7} {r['rate']:>9,.0f} {r['rss_mb']:>11,.0f} {staged:>10} "
                      f"{commit:>8} {r['samples']:>9,} {r['quarantined']:>11,}", flush=True)  # fmt: skip
    summary: dict = {"load_average": os.getloadavg(), "sizes": sizes}
    for tokenizer in args.tokenizers.split(","):
        first, last = sizes[0], sizes[-1]
        ingest = {n: results[(tokenizer, n, "ingest")] for n in sizes}
        floor = {n: results[(tokenizer, n, "floor")] for n in sizes}
        batched = {n: results[(tokenizer, n, "batched")] for n in sizes}
        summary[tokenizer] = {
            "rss_ratio_1m_over_100k": round(ingest[last]["rss_mb"] / ingest[first]["rss_mb"], 3),
            "throughput_over_floor": round(ingest[last]["rate"] / floor[last]["rate"], 3),
            "throughput_over_floor_by_size": {n: round(ingest[n]["rate"] / floor[n]["rate"], 3) for n in sizes},
            "throughput_over_batched_floor": {n: round(ingest[n]["rate"] / batched[n]["rate"], 3) for n in sizes},
            "ingest_rows_per_s": {n: round(ingest[n]["rate"]) for n in sizes},
            "floor_rows_per_s": {n: round(floor[n]["rate"]) for n in sizes},
            "ingest_peak_rss_mb": {n: round(ingest[n]["rss_mb"]) for n in sizes},
            "staged_peak_rss_mb": {n: round(ingest[n]["staged_rss_mb"]) for n in sizes},
            "commit_seconds": {n: round(ingest[n]["commit_seconds"], 1) for n in sizes},
        }
        if (whole := results.get((tokenizer, args.whole_file_rows, "whole"))) is not None:
            summary[tokenizer]["whole_file_peak_rss_mb"] = {args.whole_file_rows: round(whole["rss_mb"])}
            summary[tokenizer]["whole_file_rows_per_s"] = {args.whole_file_rows: round(whole["rate"])}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
