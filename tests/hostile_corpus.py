"""A small corpus of every kind of bad input users have sent, generated on the spot, with what ingest must
make of it: the good rows it must keep and, per file, the (line, category) of every row it must quarantine."""

from __future__ import annotations

import codecs
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class Corpus:
    files: list[Path] = field(default_factory=list)
    good: dict[str, int] = field(default_factory=dict)  # file name -> rows that must be kept
    bad: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # file name -> (line, reason)

    def add(self, path: Path, good: int, bad: list[tuple[int, str]]) -> None:
        self.files.append(path)
        self.good[path.name], self.bad[path.name] = good, bad


def _jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def write_corpus(folder: Path, labelled: bool = False) -> Corpus:
    """Files with good rows and hostile ones. ``labelled``: rows carry labels 0/1, plus label defects."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Corpus()

    def text(i: int, tag: str) -> dict:
        row = {"text": f"{tag} row {i}: a short and ordinary sentence number {i}"}
        return {**row, "label": i % 2} if labelled else row

    rows = [text(i, "jsonl") for i in range(6)] + [
        b'{"text": "lone surrogate \\ud800 in the text", "label": 1}',
        b'{"text": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"text": "' + b"x" * (5 << 20) + b'"}',  # over the default max_row_bytes (4 MiB)
        b'{"text": "cut off',
        b"[1, 2, 3]",
        b'{"text": "\xff\xfe bad bytes"}',
    ]
    bad = [(7, "invalid_text"), (8, "invalid_json"), (9, "too_long"), (10, "invalid_json"), (11, "not_an_object"),
           (12, "undecodable")]  # fmt: skip
    if labelled:
        rows += [{"text": "a row with an unknown class", "label": 7}, {"text": "a row with no label at all"}]
        bad += [(13, "unknown_label"), (14, "missing_label")]
    path = folder / "hostile.jsonl"
    path.write_bytes(_jsonl(rows))
    corpus.add(path, 6, bad)

    header = "text,label\n"
    lines = [f"csv row {i} is fine,{i % 2}\n" for i in range(4)]
    lines.insert(1, '"an unbalanced quote opens here,1\n')  # line 3: must not swallow the rows after it
    lines.insert(3, "a bare \r carriage return,0\n")  # line 5
    lines.append("y " * 100_000 + ",1\n")  # line 7: a field over Python's csv limit of 131,072 characters
    path = folder / "hostile.csv"
    path.write_bytes((header + "".join(lines)).encode())
    corpus.add(path, 4, [(3, "unbalanced_quote"), (5, "invalid_csv"), (8, "too_long")])

    path = folder / "utf16.csv"
    path.write_bytes(codecs.BOM_UTF16_LE + (header + "utf-16 text one,0\nutf-16 text two,1\n").encode("utf-16-le"))
    corpus.add(path, 2, [])
    path = folder / "bom.csv"
    path.write_bytes(codecs.BOM_UTF8 + (header + "utf-8 with a byte-order mark,1\n").encode())
    corpus.add(path, 1, [])
    path = folder / "utf16.jsonl"
    path.write_bytes(
        codecs.BOM_UTF16_BE + _jsonl([text(i, "utf-16 jsonl") for i in range(2)]).decode().encode("utf-16-be")
    )
    corpus.add(path, 2, [])
    path = folder / "nobom16.jsonl"
    path.write_bytes(_jsonl([text(0, "utf-16 without bom")]).decode().encode("utf-16-le"))
    corpus.add(path, 0, [(0, "unreadable_file")])

    whole = gzip.compress(_jsonl([text(i, "gzip") for i in range(40)]))
    path = folder / "truncated.jsonl.gz"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    corpus.add(path, -1, [(-1, "truncated_file")])  # -1: some good rows, then the cut, at a line it decides

    for name, content in (("empty.json", b""), ("blank.json", b"  \n\t\n"), ("empty.parquet", b"")):
        path = folder / name
        path.write_bytes(content)
        corpus.add(path, 0, [(0, "unreadable_file")])
    path = folder / "a-folder.jsonl"
    path.mkdir()
    corpus.add(path, 0, [(0, "unreadable_file")])

    path = folder / "good.parquet"
    pq.write_table(pa.Table.from_pylist([text(i, "parquet") for i in range(3)]), path)
    corpus.add(path, 3, [])
    return corpus


def check_quarantine(corpus: Corpus, samples: list[dict], quarantine: list[dict]) -> None:
    """Every good row kept, every bad row quarantined at its line with its category (and a detail), nothing else."""
    by_file: dict[str, list[dict]] = {}
    for q in quarantine:
        by_file.setdefault(Path(q["source"]).name, []).append(q)
    kept: dict[str, int] = {}
    for s in samples:
        kept[Path(s["source"]).name] = kept.get(Path(s["source"]).name, 0) + 1
    for name in corpus.good:
        got = sorted(by_file.get(name, []), key=lambda q: q["line"])
        want = corpus.bad[name]
        assert len(got) == len(want), f"{name}: quarantined {[(q['line'], q['reason']) for q in got]}, want {want}"
        for q, (line, category) in zip(got, want, strict=True):
            assert q["reason"] == category, f"{name} line {q['line']}: {q['reason']!r}, want {category}"
            assert q["detail"], f"{name} line {q['line']}: {category} without a detail"
            assert line in (-1, q["line"]), f"{name}: {category} at line {q['line']}, want line {line}"
        if corpus.good[name] >= 0:
            assert kept.get(name, 0) == corpus.good[name], f"{name}: kept {kept.get(name, 0)}, want {corpus.good[name]}"
        else:
            assert kept.get(name, 0) > 0, f"{name}: the rows before the cut should be kept"
