"""The streamed record of a captured run: visit rows (and features) written as Parquet parts every N steps.

Store-agnostic seam: the record only needs ``Parts`` (write_part / parts / part_path; storage.store), here the
capture run's staging folder. Parts are named ``rank<r>-step<first>-<last>`` so that each data-parallel rank
writes its own, and a resume from a checkpoint at step S cuts every part back to the visits of steps <= S
(``truncate_after``): the steps after S are trained again and recorded again, never twice.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradsift.capture.hooks import MicroResult
from gradsift.schemas.tables import CAPTURE_VISITS, capture_features_schema
from gradsift.storage.store import Parts

VISITS, FEATURES = "capture_visits", "capture_features"
_PART = re.compile(r"rank(\d+)-step(\d+)-(\d+)")


def part_name(rank: int, first: int, last: int) -> str:
    return f"rank{rank:03d}-step{first:09d}-{last:09d}"


class VisitRecord:
    """Buffers visits of one rank; ``flush`` writes them as one part per table."""

    def __init__(self, parts: Parts, run_name: str, rank: int = 0):
        self.parts, self.run_name, self.rank = parts, run_name, rank
        self.rows: list[dict[str, np.ndarray]] = []
        self.features: list[np.ndarray] = []
        self.steps: list[int] = []

    def add(self, res: MicroResult, step: int, epoch: int, lr: float) -> None:
        n = len(res.ids)
        if res.grad_norm.shape[0] != n:
            raise ValueError(f"capture: {n} sample ids for a batch of {res.grad_norm.shape[0]}")
        s = {k: v.numpy() for k, v in res.stats.items()}
        self.rows.append(
            {
                "checkpoint": np.full(n, self.run_name, dtype=object),
                "epoch": np.full(n, epoch, np.int32),
                "step": np.full(n, step, np.int64),
                "dataset": np.array([d for d, _ in res.ids], dtype=object),
                "sample_id": np.array([i for _, i in res.ids], dtype=object),
                **{k: s[k] for k in ("loss", "correct", "margin", "pred", "el2n", "n_tokens", "token_loss_max")},
                "grad_norm": res.grad_norm.numpy(),
                "lr": np.full(n, lr, np.float64),
                "rank": np.full(n, self.rank, np.int32),
            }
        )
        if res.features is not None:
            self.features.append(res.features.numpy().astype(np.float16))
        self.steps.append(step)

    def __len__(self) -> int:
        return len(self.steps)

    def flush(self) -> None:
        if not self.rows:
            return
        name = part_name(self.rank, min(self.steps), max(self.steps))
        cols = {k: np.concatenate([r[k] for r in self.rows]) for k in self.rows[0]}
        visits = pa.table({f.name: pa.array(cols[f.name], f.type) for f in CAPTURE_VISITS}, schema=CAPTURE_VISITS)
        if self.features:
            feats = np.concatenate(self.features)
            schema = capture_features_schema(feats.shape[1])
            table = pa.table(
                {
                    "step": visits["step"],
                    "rank": visits["rank"],
                    "checkpoint": visits["checkpoint"],
                    "dataset": visits["dataset"],
                    "sample_id": visits["sample_id"],
                    "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1]),
                },
                schema=schema,
            )
            self.parts.write_part(FEATURES, name, table)  # features first: a part is whole once its visits are
        self.parts.write_part(VISITS, name, visits)
        self.rows, self.features, self.steps = [], [], []

    def truncate_after(self, step: int) -> int:
        """Cut this rank's parts back to the visits of steps <= ``step`` (a resume from that checkpoint);
        returns the rows removed."""
        removed = 0
        for table in (FEATURES, VISITS):
            for path in self.parts.parts(table):
                m = _PART.fullmatch(path.stem)
                if m is None or int(m.group(1)) != self.rank or int(m.group(3)) <= step:
                    continue
                data = pq.read_table(path)
                keep = data.filter(pc.less_equal(data["step"], step))
                removed += (data.num_rows - keep.num_rows) if table == VISITS else 0
                if keep.num_rows:
                    self.parts.write_part(table, part_name(self.rank, int(m.group(2)), step), keep)
                path.unlink()
        return removed
