"""Counters and samples a run accumulates, for the report and the studies.

Theory of operation
-------------------
One :class:`Metrics` object per run. Nodes and the checker add to it as
things happen; nothing here decides anything. Counters are plain dicts
(reported with sorted keys), samples are ``array('d')`` lists. A *window*
(``measure_from``) lets a study ignore start-up: propagation samples and
write counts only accumulate for writes committed at or after it, and
:meth:`Metrics.counters` gives a flat snapshot so a study can subtract the
counters at the start of its window from those at the end.

Definitions used throughout:

* **sync event** -- one call into a replica's state machine (``hint``,
  ``response``, ``failed``, ``applied``): the unit of the events/s target;
* **shipped bytes** of a replica -- every frame it sent or received for sync:
  its requests, their answers, the hints pushed to it;
* **needed bytes** of a replica -- for every commit that changed what its
  readers see, the key and value bytes of the records whose value actually
  changed (the least any key-level protocol must ship); redundancy is
  shipped / needed;
* **staleness** of a read -- 0 if the content the reader saw is the origin's
  current content, else how long ago the origin moved past it;
* **propagation delay** -- for every origin write and every replica, the time
  from the write's commit to the replica's first commit that includes it.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field


def count(d: dict[str, int], key: str, n: int = 1) -> None:
    """``d[key] += n``."""
    d[key] = d.get(key, 0) + n


@dataclass
class Metrics:
    """Everything a run counts."""

    measure_from: float = 0.0
    sync_events: int = 0
    commits: int = 0
    writes: int = 0
    writes_refused: int = 0
    reads: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    """Requests replicas sent, by message type."""
    requests_by_phase: dict[str, int] = field(default_factory=dict)
    """Requests replicas sent, by the sync phase that sent them (diff, merkle, snapshot)."""
    answers_ignored: int = 0
    """Answers that matched no outstanding request (late or duplicated)."""
    timeouts: int = 0
    refusals: int = 0
    corrupt_frames: int = 0
    storage_errors: int = 0
    origin_requests: dict[str, int] = field(default_factory=dict)
    origin_bytes_out: int = 0
    origin_per_second: dict[int, int] = field(default_factory=dict)
    relay_requests: int = 0
    shipped: dict[str, int] = field(default_factory=dict)
    needed: dict[str, int] = field(default_factory=dict)
    staleness: array[float] = field(default_factory=lambda: array("d"))
    lag: array[float] = field(default_factory=lambda: array("d"))
    """Versions (committed origin writes) behind, per read."""
    propagation: array[float] = field(default_factory=lambda: array("d"))

    def origin_request(self, kind: str, now: float) -> None:
        count(self.origin_requests, kind)
        second = int(now)
        self.origin_per_second[second] = self.origin_per_second.get(second, 0) + 1

    def counters(self) -> dict[str, int]:
        """A flat snapshot of the scalar counters (for windowed differences)."""
        return {
            "sync_events": self.sync_events,
            "commits": self.commits,
            "writes": self.writes,
            "origin_requests": sum(self.origin_requests.values()),
            "origin_bytes_out": self.origin_bytes_out,
            "relay_requests": self.relay_requests,
            "shipped": sum(self.shipped.values()),
            "needed": sum(self.needed.values()),
        }
