"""First occurrences of fixed-width keys, compact enough to keep for every row of a file of any size.

Ingest keeps two such maps for a whole file: sample id -> first line (exact duplicates) and own id ->
(sample id, first line) (an id reused for other content). A Python dict costs over 100 bytes an entry;
here the bulk lives in sorted numpy arrays (key bytes + a 4- or 8-byte line + the payload bytes) and
only the newest entries in a small dict, merged in when it fills. Lookups for a batch of rows go to
the arrays in one vectorised search (``preload``), then each row is decided in file order.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class FirstSeen:
    """First line (and payload bytes) of each key; keys are ``key_bytes`` long, payloads ``payload_bytes``.

    Use per batch: ``preload(keys of the batch)``, then ``first_or_add`` for each row in order. A key
    not preloaded in its batch is only found among the recent entries (the arrays are not searched).
    """

    RECENT = 1024
    """The recent dict holds this many entries (or 1/32 of the arrays' if more) before a merge: ~140 bytes an
    entry there, 14-30 in the arrays; a merge copies the arrays, one at a time."""

    def __init__(self, key_bytes: int, payload_bytes: int = 0):
        self.key_bytes, self.payload_bytes = key_bytes, payload_bytes
        self._keys = np.empty(0, dtype=f"S{key_bytes}")  # S: sortable (a trailing NUL is padding, also in queries)
        self._lines = np.empty(0, dtype=np.uint32)
        self._payloads = np.empty(0, dtype=f"V{max(payload_bytes, 1)}")  # V: bytes back exactly
        self._recent: dict[bytes, bytes] = {}  # key -> the line (8 bytes) + payload, one object an entry
        self._found: dict[bytes, tuple[int, bytes]] = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)

    def preload(self, keys: Iterable[bytes]) -> None:
        """Search the arrays for the keys of the next batch at once (merging the recent entries first if due)."""
        if len(self._recent) >= max(self.RECENT, len(self._keys) // 32):
            self._merge()
        keys = list(keys)
        self._found = {}
        if not keys or not len(self._keys):
            return
        query = np.array(keys, dtype=self._keys.dtype)
        at = np.searchsorted(self._keys, query).clip(max=len(self._keys) - 1)
        for i in np.flatnonzero(self._keys[at] == query):
            j = at[i]
            self._found[keys[i]] = (int(self._lines[j]), self._payloads[j].tobytes()[: self.payload_bytes])

    def first_or_add(self, key: bytes, line: int, payload: bytes = b"") -> tuple[int, bytes] | None:
        """The (line, payload) the key was first seen with; None (and the key recorded) when it is new. ``key``
        and ``payload`` are exactly ``key_bytes`` and ``payload_bytes`` long (not checked: this runs once a row)."""
        if (recent := self._recent.get(key)) is not None:
            return int.from_bytes(recent[:8], "little"), recent[8:]
        first = self._found.get(key)
        if first is None:
            self._recent[key] = line.to_bytes(8, "little") + payload
        return first

    def _merge(self) -> None:
        keys = np.array(list(self._recent), dtype=self._keys.dtype)
        order = np.argsort(keys, kind="stable")
        values = np.frombuffer(b"".join(self._recent.values()), dtype=f"V{8 + self.payload_bytes}")[order]
        lines = values.view(np.uint8).reshape(len(values), -1)[:, :8].copy().view("<i8").ravel()
        if self._lines.dtype == np.uint32 and lines.max() >= 1 << 32:
            self._lines = self._lines.astype(np.int64)  # over 4 billion lines: 8 bytes a line from here on
        raw = values.view(np.uint8).reshape(len(values), -1)[:, 8:]
        payloads = np.zeros(len(values), dtype=self._payloads.dtype)
        payloads.view(np.uint8).reshape(len(values), -1)[:, : self.payload_bytes] = raw
        keys = keys[order]
        at = np.searchsorted(self._keys, keys)
        self._keys = np.insert(self._keys, at, keys)  # one array at a time: a merge costs one array's copy
        self._lines = np.insert(self._lines, at, lines.astype(self._lines.dtype))
        self._payloads = np.insert(self._payloads, at, payloads)
        self._recent = {}
