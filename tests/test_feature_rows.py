"""The raw feature rows beside a staged features part: equal to the part, never stale, rebuilt when missing."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from gradsift.signals.scoring import features_table
from gradsift.storage import feature_rows
from gradsift.storage.atomic import write_parquet_atomic


def _table(seed: int, n: int = 6, k: int = 8):
    feats = np.random.default_rng(seed).normal(size=(n, k)).astype(np.float16)
    rows = [{"checkpoint": "c", "dataset": "d", "sample_id": f"s{i}", "feature": f} for i, f in enumerate(feats)]
    return features_table(rows, k), feats


def _write_part(staging, part, table, rows: bool = True) -> None:
    write_parquet_atomic(table, feature_rows.part_path(staging, part))
    if rows:
        feature_rows.write_rows(staging, part, table)


def _copies(staging, part) -> list[str]:
    return sorted(p.name for p in (staging / "_scratch" / "feature_rows" / part).glob("*.npy"))


def test_rows_are_the_parts_rows_memory_mapped(tmp_path):
    table, feats = _table(0)
    _write_part(tmp_path, "p", table)
    mat = feature_rows.read_rows(tmp_path, "p", 6, 8)
    assert isinstance(mat, np.memmap)
    np.testing.assert_array_equal(mat.view(np.uint16), feats.view(np.uint16))
    decoded = feature_rows.feature_matrix(pq.read_table(feature_rows.part_path(tmp_path, "p")))
    np.testing.assert_array_equal(mat.view(np.uint16), decoded.view(np.uint16))


def test_a_rewritten_part_is_read_again_not_its_old_rows(tmp_path):
    old, _ = _table(0)
    new, feats = _table(1)
    _write_part(tmp_path, "p", old)
    before = _copies(tmp_path, "p")
    _write_part(tmp_path, "p", new, rows=False)  # e.g. a retried shard rewrote the part, then died before its rows
    got = feature_rows.read_rows(tmp_path, "p", 6, 8)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), feats.view(np.uint16))
    after = _copies(tmp_path, "p")
    assert len(after) == 1 and after != before  # rebuilt under the part's new identity, the stale copy removed
    np.testing.assert_array_equal(feature_rows.read_rows(tmp_path, "p", 6, 8).view(np.uint16), feats.view(np.uint16))


def test_missing_or_damaged_rows_are_rebuilt_from_the_part(tmp_path):
    table, feats = _table(2)
    _write_part(tmp_path, "p", table, rows=False)
    np.testing.assert_array_equal(np.asarray(feature_rows.read_rows(tmp_path, "p", 6, 8)), feats)
    (copy,) = (tmp_path / "_scratch" / "feature_rows" / "p").glob("*.npy")
    copy.write_bytes(copy.read_bytes()[:100])  # truncated
    np.testing.assert_array_equal(np.asarray(feature_rows.read_rows(tmp_path, "p", 6, 8)), feats)
    assert isinstance(feature_rows.read_rows(tmp_path, "p", 6, 8), np.memmap)


def test_rows_of_another_shape_are_an_error_when_the_part_disagrees(tmp_path):
    table, _ = _table(3)
    _write_part(tmp_path, "p", table)
    with pytest.raises(ValueError, match="expected"):
        feature_rows.read_rows(tmp_path, "p", 7, 8)


def test_prefetch_reads_the_parts_rows_and_skips_parts_without(tmp_path):
    table, _ = _table(4)
    _write_part(tmp_path, "p", table)
    _write_part(tmp_path, "q", table, rows=False)
    feature_rows.prefetch(tmp_path, ["p", "q"])  # no error for q (no rows yet)
    assert feature_rows.rows_file(tmp_path, "p").exists() and not feature_rows.rows_file(tmp_path, "q").exists()
