"""The origin's history as the checker remembers it: every state it ever had.

Theory of operation
-------------------
The invariants compare what replicas show with what the origin *had*, so the
harness records every committed origin state of every dataset, compactly:

* a global, per-dataset sequence number ``seq`` counts committed writes
  (0 = the empty dataset at creation); the origin's content is a function of
  ``seq`` alone;
* every cursor the origin ever published maps to the ``seq`` whose content it
  names. A write adds a cursor; a loss of history (a new epoch at the same
  content) adds a cursor that maps to the *current* ``seq``;
* for each ``seq``: the digest the origin computed and the time it was
  committed (so staleness and propagation delays can be measured);
* for each key, the list of ``(seq, value)`` at which it changed, so the value
  of any key at any ``seq`` is one bisection, and a whole state can be rebuilt
  for an exact comparison.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from replicad.merkle import EMPTY_DIGEST, Digest
from replicad.messages import Cursor


class OriginHistory:
    """Every state one origin dataset has had (append-only)."""

    def __init__(self, name: str, cursor: Cursor, time: float) -> None:
        self.name = name
        self.seq = 0
        self.cursors: dict[Cursor, int] = {cursor: 0}
        self.digests: list[Digest] = [EMPTY_DIGEST]
        self.times: list[float] = [time]
        self._seqs: dict[bytes, list[int]] = {}
        self._values: dict[bytes, list[bytes | None]] = {}

    def record(
        self, cursor: Cursor, changes: Mapping[bytes, bytes | None], digest: Digest, time: float
    ) -> None:
        """A write committed: ``changes`` (key -> new value, None = deleted)
        took the dataset to ``cursor`` with ``digest`` at ``time``."""
        self.seq += 1
        seq = self.seq
        for key, value in changes.items():
            seqs = self._seqs.get(key)
            if seqs is None:
                self._seqs[key] = [seq]
                self._values[key] = [value]
            else:
                seqs.append(seq)
                self._values[key].append(value)
        self.cursors[cursor] = seq
        self.digests.append(digest)
        self.times.append(time)

    def alias(self, cursor: Cursor) -> None:
        """A new epoch starts at the current content: ``cursor`` names it."""
        self.cursors[cursor] = self.seq

    def seq_of(self, cursor: Cursor) -> int | None:
        """The content sequence number ``cursor`` names, None if the origin
        never published it."""
        return self.cursors.get(cursor)

    def value_at(self, key: bytes, seq: int) -> bytes | None:
        """The value ``key`` had at ``seq`` (None: absent)."""
        seqs = self._seqs.get(key)
        if seqs is None:
            return None
        i = bisect.bisect_right(seqs, seq)
        return None if i == 0 else self._values[key][i - 1]

    def state_at(self, seq: int) -> dict[bytes, bytes]:
        """The whole content at ``seq``."""
        out: dict[bytes, bytes] = {}
        for key in self._seqs:
            value = self.value_at(key, seq)
            if value is not None:
                out[key] = value
        return out

    def superseded_at(self, seq: int) -> float | None:
        """When the content at ``seq`` stopped being current (None: it still is)."""
        return self.times[seq + 1] if seq < self.seq else None
