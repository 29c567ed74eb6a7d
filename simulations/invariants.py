"""Invariants, checked while the simulation runs.

Theory of operation
-------------------
The checker sits between each replica's state machine and its mirror: the
node calls :meth:`Checker.before_apply` and :meth:`Checker.after_apply` around
every ``mirror.apply(batch)``, and :meth:`Checker.read` for every simulated
reader. It keeps, per replica and dataset, a :class:`Watch`: the last cursor
and content sequence it showed, and its *own* digest of the live records
(count and XOR of :func:`~replicad.merkle.entry_hash`), maintained from the
records themselves -- never from the mirror's Merkle tree, which is one of the
things being checked. After every commit that changes what readers see:

1. **known state** -- the mirror's cursor is one the origin published;
2. **never backwards** -- the content it names is not older than what the
   replica showed before, and within one epoch the version does not decrease;
3. **digest matches content** -- the mirror's tree digest equals the digest
   of its records;
4. **origin state** -- the records equal the origin's content at that
   cursor: the digests must be equal at every commit, and every
   ``full_check_every`` commits (and at the end) the records are compared
   key by key with the state rebuilt from :class:`OriginHistory`.

Every read checks each value the reader saw against the origin's value at
the reader's cursor. Liveness -- convergence within the bound once faults
heal -- is checked by the world, which owns the clock.

A broken invariant raises :class:`InvariantError`, which ends the run; the report
then carries it with the seed and the command that replays it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from replicad.memory import MemoryMirror
from replicad.merkle import entry_hash
from replicad.messages import Cursor
from replicad.replica import Apply, Target
from simulations.history import OriginHistory
from simulations.metrics import Metrics, count


class InvariantError(Exception):
    """An invariant does not hold. ``kind`` names it; the message says where."""

    def __init__(self, kind: str, node: str, dataset: str, time: float, detail: str) -> None:
        super().__init__(f"[{kind}] {node}/{dataset} at t={time:.6f}: {detail}")
        self.kind = kind
        self.node = node
        self.dataset = dataset
        self.time = time
        self.detail = detail


@dataclass
class Watch:
    """What the checker knows about one dataset of one replica."""

    node: str
    dataset: str
    mirror: MemoryMirror
    cursor: Cursor | None = None
    seq: int = -1
    count: int = 0
    xor: int = 0
    commits: int = 0
    captured: dict[bytes, bytes | None] | None = None
    captured_live: dict[bytes, bytes] | None = None


def _digest_of(records: dict[bytes, bytes]) -> tuple[int, int]:
    x = 0
    for k, v in records.items():
        x ^= entry_hash(k, v)
    return len(records), x


class Checker:
    """Checks every replica commit and every read against the origin's history."""

    def __init__(
        self,
        histories: dict[str, OriginHistory],
        metrics: Metrics,
        *,
        full_check_every: int = 25,
    ) -> None:
        self.histories = histories
        self.metrics = metrics
        self.full_check_every = full_check_every
        self.watches: list[Watch] = []
        self.full_checks = 0
        self._state: tuple[str, int, dict[bytes, bytes]] | None = None
        self.on_commit: Callable[[Watch, float], None] | None = None
        """Called after every checked commit (the world tracks convergence)."""

    def watch(self, node: str, dataset: str, mirror: MemoryMirror) -> Watch:
        """Start watching a (fresh, empty) mirror."""
        w = Watch(node, dataset, mirror)
        w.count, w.xor = _digest_of(mirror.live.records)
        self.watches.append(w)
        return w

    # --- commits

    def before_apply(self, w: Watch, batch: Apply) -> None:
        """Remember what the batch may change."""
        records = w.mirror.live.records
        if batch.target is Target.LIVE:
            captured = {k: records.get(k) for k, _ in batch.upserts}
            for k in batch.deletes:
                captured[k] = records.get(k)
            w.captured = captured
            w.captured_live = None
        elif batch.promote:
            w.captured = None
            w.captured_live = dict(records)
        else:
            w.captured = w.captured_live = None

    def after_apply(self, w: Watch, batch: Apply, ok: bool, now: float) -> None:
        """Check the mirror after ``mirror.apply(batch)`` returned ``ok``."""
        visible = batch.target is Target.LIVE or batch.promote
        captured, captured_live = w.captured, w.captured_live
        w.captured = w.captured_live = None
        if not ok or not visible:
            return
        mirror = w.mirror
        records = mirror.live.records
        needed = 0
        if captured is not None:
            c, x = w.count, w.xor
            for k, old in captured.items():
                new = records.get(k)
                if old == new:
                    continue
                needed += len(k) + (0 if new is None else len(new))
                if old is not None:
                    x ^= entry_hash(k, old)
                    c -= 1
                if new is not None:
                    x ^= entry_hash(k, new)
                    c += 1
            w.count, w.xor = c, x
        else:
            old_records = captured_live or {}
            for k, new in records.items():
                if old_records.get(k) != new:
                    needed += len(k) + len(new)
            needed += sum(len(k) for k in old_records if k not in records)
            w.count, w.xor = _digest_of(records)
        count(self.metrics.needed, w.node, needed)
        self.metrics.commits += 1
        self._check_commit(w, now)

    def _check_commit(self, w: Watch, now: float) -> None:
        mirror = w.mirror
        cursor = mirror.cursor
        history = self.histories[w.dataset]
        if cursor is None:
            raise InvariantError("known-state", w.node, w.dataset, now, "a commit left no cursor")
        seq = history.seq_of(cursor)
        if seq is None:
            raise InvariantError(
                "known-state",
                w.node,
                w.dataset,
                now,
                f"cursor {cursor} was never published by the origin",
            )
        prev = w.cursor
        if seq < w.seq or (
            prev is not None and prev.epoch == cursor.epoch and cursor.version < prev.version
        ):
            raise InvariantError(
                "backwards",
                w.node,
                w.dataset,
                now,
                f"went from {prev} (content #{w.seq}) back to {cursor} (content #{seq})",
            )
        digest = mirror.tree.digest
        if (digest.count, digest.xor) != (w.count, w.xor):
            raise InvariantError(
                "digest",
                w.node,
                w.dataset,
                now,
                f"mirror digest {digest.hex()} does not match its {len(mirror.live.records)} "
                f"records (count {w.count}, xor {w.xor:032x})",
            )
        expected = history.digests[seq]
        if (expected.count, expected.xor) != (w.count, w.xor):
            raise InvariantError(
                "origin-state",
                w.node,
                w.dataset,
                now,
                f"content at {cursor} differs from the origin's content #{seq} "
                f"({w.count} records, origin had {expected.count})",
            )
        if w.seq >= 0 and seq > w.seq:
            start = max(w.seq + 1, 1)
            times = history.times
            prop = self.metrics.propagation
            floor = self.metrics.measure_from
            for s in range(start, seq + 1):
                if times[s] >= floor:
                    prop.append(now - times[s])
        w.cursor = cursor
        w.seq = seq
        w.commits += 1
        if self.full_check_every and w.commits % self.full_check_every == 0:
            self.full_check(w, now)
        if self.on_commit is not None:
            self.on_commit(w, now)

    def full_check(self, w: Watch, now: float) -> None:
        """Compare the live records key by key with the origin's state at the
        mirror's cursor (a no-op before the first sync)."""
        cursor = w.mirror.cursor
        if cursor is None:
            return
        history = self.histories[w.dataset]
        seq = history.seq_of(cursor)
        if seq is None:
            raise InvariantError(
                "known-state", w.node, w.dataset, now, f"cursor {cursor} was never published"
            )
        self.full_checks += 1
        cached = self._state
        if cached is not None and cached[0] == w.dataset and cached[1] == seq:
            expected = cached[2]
        else:
            expected = history.state_at(seq)
            self._state = (w.dataset, seq, expected)
        records = w.mirror.live.records
        if records != expected:
            extra = sorted(k for k in records if records.get(k) != expected.get(k))
            missing = sorted(k for k in expected if k not in records)
            raise InvariantError(
                "origin-state",
                w.node,
                w.dataset,
                now,
                f"records at {cursor} differ from the origin's content #{seq}: "
                f"{len(extra)} wrong or extra keys (first {extra[:3]!r}), "
                f"{len(missing)} missing (first {missing[:3]!r})",
            )

    # --- reads

    def read(self, w: Watch, keys: Iterable[bytes], now: float) -> None:
        """A reader read ``keys`` (and the cursor) from the live mirror."""
        mirror = w.mirror
        cursor = mirror.cursor
        if cursor is None:
            return  # not ready: the sidecar refuses reads
        history = self.histories[w.dataset]
        seq = history.seq_of(cursor)
        if seq is None:
            raise InvariantError(
                "known-state", w.node, w.dataset, now, f"reader saw unknown cursor {cursor}"
            )
        records = mirror.live.records
        for key in keys:
            seen = records.get(key)
            if seen != history.value_at(key, seq):
                raise InvariantError(
                    "read",
                    w.node,
                    w.dataset,
                    now,
                    f"reader saw {key!r} = {seen!r} at {cursor}, "
                    f"the origin had {history.value_at(key, seq)!r}",
                )
        m = self.metrics
        m.reads += 1
        superseded = history.superseded_at(seq)
        m.staleness.append(0.0 if superseded is None else max(0.0, now - superseded))
        m.lag.append(float(history.seq - seq))
