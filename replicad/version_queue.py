"""The merge-degrading version queue: which keys changed since version V.

Theory of operation
-------------------
Every committed write batch at the origin gets the next version (current + 1).
The queue records, per batch, the set of keys the batch touched. A replica at
version ``v`` asks "what changed since ``v``?"; the origin answers with the
union of the key sets of every entry newer than ``v`` and ships those keys'
current values (an absent key is a tombstone). Because the values are read at
answer time, the answer brings the replica to the origin's current state no
matter how many times each key changed in between.

An :class:`Entry` ``(version, keys)`` covers the versions
``(previous entry's version, version]`` -- the first entry covers
``(floor, version]``. Entries are kept oldest first, so ``keys_since(v)`` is a
bisection to the first entry whose version is above ``v`` followed by a union
from there to the end. Batches that touch no key still bump the version but
add no entry: the next entry's range simply covers them.

The queue is bounded by ``max_entries``. When a push makes it longer, a
:class:`MergePolicy` merges *adjacent* entries (the merged entry takes the
larger version and the union of the keys). Merging never breaks correctness --
a range that covered ``(a, b]`` and one that covered ``(b, c]`` become one that
covers ``(a, c]`` with every key of both -- it only makes some answers
redundant: a replica at a version inside a merged range also receives the keys
changed in the part of the range it already has. Replicas are usually nearly
current, so precision matters most for the newest entries:

* :class:`HalvingPolicy` (``"halving"``) is the seed's: merge every adjacent
  pair, halving the queue. Cheap (once per ``max_entries / 2`` pushes) but it
  coarsens the newest entries too, and its reach is short: each halving
  doubles every old entry, so history older than a few times ``max_entries``
  versions collapses into one entry.
* :class:`OldestFirstPolicy` (``"oldest-first"``) merges the oldest entries
  into one: everything newer stays exact, everything older is one blob. The
  blob is rewritten on every push once the queue is full.
* :class:`BinaryCounterPolicy` (``"binary-counter"``) keeps the newest entries
  exact and older ones at exponentially coarser granularity, like the buckets
  of an exponential histogram: on overflow, at most ``k`` entries per size
  class (an entry covering ``s`` versions is in class ``floor(log2 s)``), the
  two oldest of an over-full class merging into the next class.

The default is ``"binary-counter"`` (:data:`DEFAULT_POLICY`), from
``benchmarks/bench_version_queue.py`` (100,000 keys, Zipf-skewed batches, after
20,000 batches): at lags of 1-10 versions all three policies ship close to
the exact key set (q >= 64, within ~2%); at a lag of 1000 the binary counter ships 1.01-1.08x
the needed keys where halving and oldest-first ship 2.7-3.1x (q = 64, 256),
because their oldest entry has swallowed most of the key space; it costs
9% more than halving at lag 100 with q = 64 (and 15% more at lag 10 with a
tiny q = 16). Its upkeep is like halving's (q = 1024: about 0.1 ms per push
amortized for both, 0.86x halving's persisted keys per push), while
oldest-first rewrites its ~100,000-key oldest entry on every push (7 ms and
~100,000 persisted keys per push). The simulation study may revise this
choice; ``BinaryCounterPolicy(per_class=...)`` trades reach for precision.

A second bound, ``max_keys``, caps the total number of keys held (the memory
and persistence cost). Past it the oldest entries are dropped and the
``floor`` rises to the last dropped version; replicas older than the floor get
:class:`~replicad.errors.HistoryTruncatedError` and must fall back to Merkle
sync or a snapshot.

Persistence: :meth:`VersionQueue.push` returns a :class:`QueueDelta` (versions
removed, entries added, new floor) so an adapter can keep one record per entry
and write only what changed; :meth:`VersionQueue.from_entries` reloads from
those records. :meth:`VersionQueue.to_bytes` / :meth:`VersionQueue.from_bytes`
serialize the whole queue as one msgpack document.

The queue does no I/O and reads no clock; it is single-threaded (adapters
serialize pushes with the write transaction that commits the batch).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

import msgpack

from replicad.errors import (
    ConfigError,
    CorruptStateError,
    CursorAheadError,
    EpochMismatchError,
    HistoryTruncatedError,
    VersionOrderError,
)

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_POLICY",
    "EPOCH_BYTES",
    "POLICIES",
    "BinaryCounterPolicy",
    "Entry",
    "HalvingPolicy",
    "MergePolicy",
    "OldestFirstPolicy",
    "QueueDelta",
    "VersionQueue",
    "decode_entry",
    "encode_entry",
    "policy_by_name",
]

EPOCH_BYTES = 16
"""Length of an epoch id: 16 random bytes chosen by the caller."""

DEFAULT_MAX_ENTRIES = 1024
"""Default bound on the number of entries."""

_FORMAT = 1  # version of the to_bytes document layout


@dataclass(frozen=True, slots=True)
class Entry:
    """The keys written by the batches in ``(previous entry's version, version]``.

    The first entry of a queue covers ``(floor, version]``.
    """

    version: int
    keys: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class QueueDelta:
    """What one :meth:`VersionQueue.push` changed, for incremental persistence.

    To bring per-entry records (one per version) up to date: delete every
    version in ``removed`` (a version without a record is a no-op), then write
    every entry in ``added`` (it may overwrite the record of its version), then
    store ``floor`` (and the queue's new version). ``added`` never contains a
    version listed in ``removed``.
    """

    removed: tuple[int, ...]
    added: tuple[Entry, ...]
    floor: int


_version_of = attrgetter("version")


def _merge_run(run: Sequence[Entry]) -> Entry:
    """One entry covering the adjacent entries of ``run`` (oldest first)."""
    if len(run) == 1:
        return run[0]
    if len(run) == 2:
        return Entry(run[1].version, run[0].keys | run[1].keys)
    return Entry(run[-1].version, frozenset().union(*[e.keys for e in run]))


def _merge_oldest(entries: list[Entry], max_entries: int) -> list[Entry]:
    """Merge the oldest entries into one until ``len <= max_entries``."""
    n = len(entries)
    if n <= max_entries:
        return entries
    cut = n - max_entries + 1
    return [_merge_run(entries[:cut]), *entries[cut:]]


class MergePolicy(Protocol):
    """How a full queue is coarsened.

    ``merge`` receives the entries (oldest first) after a push made them longer
    than ``max_entries`` (or a reloaded queue that is already longer) and
    returns a new list of at most ``max_entries`` entries, obtained only by
    merging *adjacent* entries (a merged entry takes the larger version and
    the union of the keys). It must not mutate its argument, and it should
    return untouched entries as the same objects (the queue diffs by identity
    to report a :class:`QueueDelta`). The newest version always survives.
    """

    name: str

    def merge(self, entries: list[Entry], max_entries: int) -> list[Entry]:
        """Return the merged list; see the class docstring."""
        ...


class HalvingPolicy:
    """The seed's policy: merge pairs ``(0, 1), (2, 3), ...``, halving the queue.

    With an odd count the newest entry stays alone. Repeats until within the
    bound (once, unless a reloaded queue is far over it).
    """

    name = "halving"

    def merge(self, entries: list[Entry], max_entries: int) -> list[Entry]:
        """Halve ``entries`` until ``len <= max_entries``."""
        out = entries
        while len(out) > max_entries:
            n = len(out)
            halved = [
                Entry(out[i + 1].version, out[i].keys | out[i + 1].keys) for i in range(0, n - 1, 2)
            ]
            if n % 2:
                halved.append(out[-1])
            out = halved
        return out


class OldestFirstPolicy:
    """Merge the oldest entries into one until within the bound.

    The newest ``max_entries - 1`` entries stay exact; all older history is one
    entry, which is rewritten on every push once the queue is full.
    """

    name = "oldest-first"

    def merge(self, entries: list[Entry], max_entries: int) -> list[Entry]:
        """Merge the oldest ``len - max_entries + 1`` entries into one."""
        return _merge_oldest(entries, max_entries)


class BinaryCounterPolicy:
    """Newest entries exact, older ones exponentially coarser.

    An entry covering ``s`` versions is in size class ``floor(log2(s))`` (the
    policy does not see the floor, so the oldest entry's span is taken from
    version 0, an overestimate). On overflow, a pass from the newest entry to the oldest keeps at
    most ``per_class`` entries per class: while a class holds more, its two
    oldest entries merge into one of the next class (a carry, as in a binary
    counter). Classes are taken as a running maximum from newest to oldest, so
    the entries of one class are always adjacent. If the result is still over
    ``max_entries``, the oldest entries are merged into one.

    Between overflows new entries are appended exact, so right after a pass the
    queue holds about ``per_class * log2(history / per_class)`` entries and the
    rest of its capacity fills with exact entries. ``per_class`` (``k``) trades
    precision (an entry's span is at most about ``1 / (k - 1)`` of its age)
    against reach (the history covered before the fallback blob). When not
    given, each pass picks the largest ``k >= 2`` whose layout of the whole
    history (the newest version, since the floor is not visible) fits in three
    quarters of ``max_entries``, so the queue keeps a uniform relative precision
    over all of its history and a pass leaves a quarter of the capacity for
    exact entries (passes cost O(n), so they come at most once per
    ``max_entries / 4`` pushes). ``k = 1`` is allowed but leaves gaps (a class
    may be empty), so an entry can span more than its age.
    """

    name = "binary-counter"

    def __init__(self, per_class: int | None = None) -> None:
        """``per_class``: entries kept per size class (None: chosen per pass
        from the bound and the history). Raises :class:`ConfigError` if it is
        not an int >= 1."""
        if per_class is not None and (type(per_class) is not int or per_class < 1):
            raise ConfigError(f"per_class must be an int >= 1, got {per_class!r}")
        self.per_class = per_class

    def merge(self, entries: list[Entry], max_entries: int) -> list[Entry]:
        """Carry pass, then merge the oldest if still over ``max_entries``."""
        if len(entries) <= max_entries:
            return entries
        k = self.per_class
        if k is None:
            k = _auto_per_class(max_entries, entries[-1].version)
        return _merge_oldest(_carry_pass(entries, k), max_entries)


def _auto_per_class(max_entries: int, history: int) -> int:
    """The largest ``k >= 2`` with ``k * (log2(history / k) + 1)`` (the entries
    of a carried layout of ``history`` versions) within 3/4 of the bound."""
    budget = max_entries * 3 // 4
    k = 2
    while (k + 1) * (math.log2(max(history / (k + 1), 1.0)) + 1) <= budget:
        k += 1
    return k


def _carry_pass(entries: list[Entry], k: int) -> list[Entry]:
    """Keep at most ``k`` entries per size class, carrying the two oldest of an
    over-full class into the next one. O(len(entries)) plus the unions."""
    # A stack of (entry, span), oldest first: the top is the newest.
    # The oldest entry's lower bound (the floor) is unknown here: taking it as
    # 0 overestimates that span, which can only put the entry in a coarser class.
    stack: list[tuple[Entry, int]] = []
    prev = 0
    for e in entries:
        stack.append((e, max(1, e.version - prev)))
        prev = e.version
    out_newest_first: list[Entry] = []
    level = 0
    while stack:
        level = max(level, stack[-1][1].bit_length() - 1)
        run: list[tuple[Entry, int]] = []  # newest first
        while stack and stack[-1][1].bit_length() - 1 <= level:
            run.append(stack.pop())
        carries: list[tuple[Entry, int]] = []  # oldest first
        while len(run) > k:
            older, older_span = run.pop()
            newer, newer_span = run.pop()
            merged = Entry(newer.version, older.keys | newer.keys)
            carries.append((merged, older_span + newer_span))
        out_newest_first.extend(e for e, _ in run)
        stack.extend(carries)
        level += 1
    out_newest_first.reverse()
    return out_newest_first


POLICIES: dict[str, Callable[[], MergePolicy]] = {
    HalvingPolicy.name: HalvingPolicy,
    OldestFirstPolicy.name: OldestFirstPolicy,
    BinaryCounterPolicy.name: BinaryCounterPolicy,
}
"""Merge policies by name; each value builds a fresh policy with defaults."""

DEFAULT_POLICY = BinaryCounterPolicy.name
"""The policy a queue uses when none is given (see the benchmark figures)."""


def policy_by_name(name: str) -> MergePolicy:
    """A new policy of the given name; raises :class:`ConfigError` if unknown."""
    try:
        factory = POLICIES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(POLICIES))
        raise ConfigError(f"unknown merge policy {name!r} (known: {known})") from None
    return factory()


def _check_config(max_entries: int, max_keys: int | None) -> None:
    if type(max_entries) is not int or max_entries < 1:
        raise ConfigError(f"max_entries must be an int >= 1, got {max_entries!r}")
    if max_keys is not None and (type(max_keys) is not int or max_keys < 1):
        raise ConfigError(f"max_keys must be None or an int >= 1, got {max_keys!r}")


def _check_epoch(epoch: object, error: type[Exception]) -> bytes:
    if type(epoch) is not bytes or len(epoch) != EPOCH_BYTES:
        raise error(f"epoch must be {EPOCH_BYTES} bytes, got {epoch!r}")
    return epoch


def _is_version(v: object) -> bool:
    return type(v) is int and v >= 0


def _diff(old: list[Entry], new: list[Entry]) -> tuple[list[int], list[Entry], int]:
    """(versions removed, entries added, change of the key total) from ``old``
    to ``new``, where ``new`` was made from ``old`` by merging adjacent entries
    and untouched entries are the same objects."""
    n_old, n_new = len(old), len(new)
    m = min(n_old, n_new)
    p = 0
    while p < m and old[p] is new[p]:
        p += 1
    # Common suffix; first try the usual shape "only the front changed" in C.
    s = 0
    if n_new - 1 > 0 and n_new - 1 <= m - p and old[n_old - n_new + 1 :] == new[1:]:
        s = n_new - 1
    while s < m - p and old[n_old - 1 - s] is new[n_new - 1 - s]:
        s += 1
    old_mid = old[p : n_old - s]
    new_mid = new[p : n_new - s]
    kept_versions = {e.version for e in new_mid}
    removed = [e.version for e in old_mid if e.version not in kept_versions]
    old_ids = {id(e) for e in old_mid}
    added = [e for e in new_mid if id(e) not in old_ids]
    change = sum(len(e.keys) for e in new_mid) - sum(len(e.keys) for e in old_mid)
    return removed, added, change


class VersionQueue:
    """Bounded ``version -> keys changed`` history of one dataset.

    ``epoch`` is 16 random bytes chosen by the caller (new whenever history is
    lost); ``floor`` is the oldest version the queue can answer from (a replica
    at ``version >= floor`` can be served); the version starts at ``floor``.
    ``max_entries`` bounds the entries (merged by ``policy`` past it, default
    :data:`DEFAULT_POLICY`); ``max_keys``, if set, bounds the total keys held
    (oldest entries dropped past it, raising the floor).

    Raises :class:`ConfigError` for an epoch that is not 16 bytes, a negative
    floor, ``max_entries < 1`` or ``max_keys < 1``.
    """

    def __init__(
        self,
        epoch: bytes,
        *,
        floor: int = 0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_keys: int | None = None,
        policy: MergePolicy | None = None,
    ) -> None:
        _check_epoch(epoch, ConfigError)
        if not _is_version(floor):
            raise ConfigError(f"floor must be an int >= 0, got {floor!r}")
        _check_config(max_entries, max_keys)
        self._epoch = epoch
        self._floor = floor
        self._version = floor
        self._entries: list[Entry] = []
        self._total = 0
        self._max_entries = max_entries
        self._max_keys = max_keys
        self._policy: MergePolicy = policy if policy is not None else policy_by_name(DEFAULT_POLICY)

    # --- state --------------------------------------------------------------

    @property
    def epoch(self) -> bytes:
        """The epoch id this history belongs to."""
        return self._epoch

    @property
    def version(self) -> int:
        """The version of the last pushed batch (``floor`` before any push)."""
        return self._version

    @property
    def floor(self) -> int:
        """The oldest version ``keys_since`` can answer from."""
        return self._floor

    @property
    def entries(self) -> tuple[Entry, ...]:
        """A snapshot of the entries, oldest first (O(n) copy)."""
        return tuple(self._entries)

    @property
    def max_entries(self) -> int:
        """The bound on the number of entries."""
        return self._max_entries

    @property
    def max_keys(self) -> int | None:
        """The bound on the total keys held, or None."""
        return self._max_keys

    @property
    def policy(self) -> MergePolicy:
        """The merge policy in use."""
        return self._policy

    def total_keys(self) -> int:
        """The number of keys held, summed over entries (O(1))."""
        return self._total

    def __repr__(self) -> str:
        return (
            f"VersionQueue(epoch={self._epoch.hex()}, floor={self._floor}, "
            f"version={self._version}, entries={len(self._entries)}, "
            f"keys={self._total}, policy={self._policy.name!r})"
        )

    def copy(self) -> VersionQueue:
        """An independent queue with the same state, in O(entries): entries are
        immutable, so they are shared. Lets an adapter push onto a copy inside
        a transaction and switch to it only once the transaction commits."""
        other = VersionQueue.__new__(VersionQueue)
        other.__dict__.update(self.__dict__)
        other._entries = list(self._entries)
        return other

    # --- writes -------------------------------------------------------------

    def push(self, version: int, keys: Iterable[bytes]) -> QueueDelta:
        """Record the batch committed as ``version``, which touched ``keys``.

        ``version`` must be exactly ``self.version + 1``; ``keys`` may be empty
        (the version still advances, no entry is added). Keys are taken as
        given (the codec has validated them). Merges per the policy when the
        queue grows past ``max_entries``, then drops the oldest entries while
        the key total is above ``max_keys``, raising the floor to the last
        dropped version. Returns what changed, for incremental persistence.

        Raises :class:`VersionOrderError` for any other version and
        :class:`ConfigError` if the policy breaks its contract (returns more
        than ``max_entries`` entries or loses the newest version); in both
        cases, and if the policy itself raises, the queue is unchanged.
        """
        if version != self._version + 1 or type(version) is not int:
            raise VersionOrderError(f"pushed version {version!r}, expected {self._version + 1}")
        ks = keys if type(keys) is frozenset else frozenset(keys)
        if not ks:
            self._version = version
            return QueueDelta((), (), self._floor)
        entry = Entry(version, ks)
        entries = self._entries
        entries.append(entry)
        total = self._total + len(ks)
        removed: list[int] = []
        added: list[Entry] = [entry]
        if len(entries) > self._max_entries:
            try:
                merged = self._policy.merge(entries, self._max_entries)
            except BaseException:
                entries.pop()
                raise
            if len(merged) > self._max_entries or not merged or merged[-1].version != version:
                entries.pop()
                raise ConfigError(
                    f"merge policy {self._policy.name!r} returned {len(merged)} entries "
                    f"(bound {self._max_entries}) or lost the newest version"
                )
            removed, added, change = _diff(entries, merged)
            total += change
            if not added or added[-1].version != version:
                added.append(merged[-1])  # the new entry was never persisted
            self._entries = merged
        self._version = version
        self._total = total
        if self._max_keys is not None and total > self._max_keys:
            removed.extend(self._truncate(self._max_keys))
            floor = self._floor
            added = [e for e in added if e.version > floor]
        return QueueDelta(tuple(removed), tuple(added), self._floor)

    def advance(self, version: int, keys: Iterable[bytes]) -> QueueDelta:
        """:meth:`push` for a change that spans versions ``(self.version,
        version]`` at once -- a relay applying one diff that brought it
        several origin versions ahead. ``keys`` must cover every key changed
        in that span. Raises :class:`VersionOrderError` unless ``version >
        self.version``; the queue is unchanged after any error."""
        if type(version) is not int or version <= self._version:
            raise VersionOrderError(f"advanced to {version!r}, not after {self._version}")
        saved = self._version
        self._version = version - 1
        try:
            return self.push(version, keys)
        except BaseException:
            self._version = saved
            raise

    def _truncate(self, max_keys: int) -> list[int]:
        """Drop the oldest entries until the key total is within ``max_keys``;
        return the dropped versions."""
        entries = self._entries
        total = self._total
        drop = 0
        while drop < len(entries) and total > max_keys:
            total -= len(entries[drop].keys)
            drop += 1
        dropped = [e.version for e in entries[:drop]]
        self._floor = dropped[-1]
        del entries[:drop]
        self._total = total
        return dropped

    # --- reads --------------------------------------------------------------

    def keys_since(self, epoch: bytes, since: int) -> frozenset[bytes] | set[bytes]:
        """Every key written in versions ``(since, version]`` -- a superset when
        merged entries straddle ``since``, exact when nothing relevant was
        merged. Time is proportional to the entries and keys it touches.

        The result may be an entry's own frozenset (do not rely on identity)
        or a new set the caller owns. Raises :class:`EpochMismatchError` if
        ``epoch`` is not this queue's, :class:`CursorAheadError` if ``since >
        version``, :class:`HistoryTruncatedError` if ``since < floor``. The
        queue never changes on a read.
        """
        if epoch != self._epoch:
            raise EpochMismatchError("the cursor's epoch is not this dataset's epoch")
        if since > self._version:
            raise CursorAheadError(f"cursor version {since} is ahead of {self._version}")
        if since < self._floor:
            raise HistoryTruncatedError(
                f"cursor version {since} is older than the queue's floor {self._floor}"
            )
        entries = self._entries
        i = bisect.bisect_right(entries, since, key=_version_of)
        n = len(entries) - i
        if n == 0:
            return frozenset()
        if n == 1:
            return entries[i].keys
        return set().union(*[e.keys for e in entries[i:]])

    # --- persistence --------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole queue as one msgpack document (keys sorted: canonical).

        Configuration (bounds, policy) is not included; pass it to
        :meth:`from_bytes`.
        """
        doc = [
            _FORMAT,
            self._epoch,
            self._floor,
            self._version,
            [[e.version, sorted(e.keys)] for e in self._entries],
        ]
        return bytes(msgpack.packb(doc, use_bin_type=True))

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_keys: int | None = None,
        policy: MergePolicy | None = None,
    ) -> VersionQueue:
        """Rebuild a queue from :meth:`to_bytes` output.

        Raises :class:`CorruptStateError` if ``data`` is not such a document
        or is inconsistent, :class:`ConfigError` for bad bounds. A queue longer
        than ``max_entries`` (or above ``max_keys``) is loaded as is and comes
        within bounds at the next push.
        """
        doc = _unpack(data)
        if not isinstance(doc, list) or len(doc) != 5 or doc[0] != _FORMAT:
            raise CorruptStateError("not a version queue document (format 1)")
        _, epoch, floor, version, raw_entries = doc
        if not isinstance(raw_entries, list):
            raise CorruptStateError("version queue entries are not a list")
        entries = [_entry_from_obj(obj) for obj in raw_entries]
        return cls.from_entries(
            epoch,
            floor,
            version,
            entries,
            max_entries=max_entries,
            max_keys=max_keys,
            policy=policy,
        )

    @classmethod
    def from_entries(
        cls,
        epoch: bytes,
        floor: int,
        version: int,
        entries: Iterable[Entry],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_keys: int | None = None,
        policy: MergePolicy | None = None,
    ) -> VersionQueue:
        """Rebuild a queue from per-entry persistence (see :class:`QueueDelta`).

        ``entries`` may come in any order. Raises :class:`CorruptStateError`
        if the state is inconsistent (epoch not 16 bytes, ``version < floor``,
        duplicate versions, an entry outside ``(floor, version]``, a key that
        is not bytes) and :class:`ConfigError` for bad bounds.
        """
        _check_config(max_entries, max_keys)
        _check_epoch(epoch, CorruptStateError)
        if not _is_version(floor) or not _is_version(version) or version < floor:
            raise CorruptStateError(f"bad floor/version {floor!r}/{version!r}")
        items = list(entries)
        for e in items:
            if type(e) is not Entry or type(e.version) is not int:
                raise CorruptStateError(f"not an entry: {e!r}")
        ordered = sorted(items, key=_version_of)
        prev = floor
        total = 0
        for e in ordered:
            if not prev < e.version <= version:
                raise CorruptStateError(
                    f"entry version {e.version} out of order or outside ({floor}, {version}]"
                )
            if type(e.keys) is not frozenset or not all(type(k) is bytes for k in e.keys):
                raise CorruptStateError(f"entry {e.version} keys are not a set of bytes")
            prev = e.version
            total += len(e.keys)
        queue = cls(epoch, floor=floor, max_entries=max_entries, max_keys=max_keys, policy=policy)
        queue._version = version
        queue._entries = ordered
        queue._total = total
        return queue


def encode_entry(entry: Entry) -> bytes:
    """One entry as msgpack ``[version, sorted keys]`` (canonical bytes)."""
    return bytes(msgpack.packb([entry.version, sorted(entry.keys)], use_bin_type=True))


def decode_entry(data: bytes) -> Entry:
    """Inverse of :func:`encode_entry`; raises :class:`CorruptStateError`."""
    return _entry_from_obj(_unpack(data))


def _unpack(data: bytes) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorruptStateError(f"expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptStateError(f"undecodable version queue state: {exc}") from exc


def _entry_from_obj(obj: Any) -> Entry:
    if not isinstance(obj, list) or len(obj) != 2:
        raise CorruptStateError("a version queue entry is not [version, keys]")
    version, keys = obj
    if type(version) is not int or version < 1:
        raise CorruptStateError(f"bad entry version {version!r}")
    if not isinstance(keys, list) or not all(type(k) is bytes for k in keys):
        raise CorruptStateError(f"entry {version} keys are not a list of bytes")
    return Entry(version, frozenset(keys))
