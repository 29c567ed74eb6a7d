"""Version queue: diff redundancy of the merge policies, and push/read cost.

Workload (the same for every policy, drawn from one seeded PRNG):

* a key space of 100,000 keys (10,000 in quick mode);
* each write batch draws 100 keys with Zipf skew (P(key of rank r) ~ 1/r^0.9,
  so a few keys are hot and appear in most batches) and writes the distinct
  ones -- about 80 keys per batch at full size;
* a warm-up of 20,000 batches (2,000 quick) so merging is in steady state,
  then 512 measured batches (128 quick);
* after every measured batch, a replica lagging ``lag`` versions (1, 10, 100,
  1000) asks ``keys_since(version - lag)``.

``redundancy = keys shipped / keys needed``, summed over the measured batches,
where "needed" is the number of distinct keys written in the last ``lag``
batches (what an exact queue would ship). 1.0 is perfect. The halving policy
(the seed's) is the anchor of the other policies' rows, per queue length
(``q`` = max_entries: 16, 64, 256) and lag.

Cost rows (q = 1024, the default bound; same workload):

* ``push`` -- mean microseconds per push over the measured batches, merges
  included (oldest-first rewrites its growing oldest entry on every push);
* ``persisted keys per push`` -- keys in the entries a push asks the adapter to
  write (``QueueDelta.added``), i.e. the write volume of per-entry persistence;
* ``keys_since`` -- microseconds per call for lags 1 and 100.

Run alone: ``.venv/bin/python -m benchmarks.bench_version_queue [--quick]``.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.common import Row, median_time
from replicad.version_queue import (
    POLICIES,
    Entry,
    HalvingPolicy,
    MergePolicy,
    OldestFirstPolicy,
    VersionQueue,
)

EPOCH = b"\x00" * 16
SEED = 20240601
ZIPF_S = 0.9
BATCH_DRAWS = 100
LAGS = (1, 10, 100, 1000)
QUEUE_LENGTHS = (16, 64, 256, 1024)
COST_QUEUE_LENGTH = 1024


@dataclass(frozen=True)
class Workload:
    """Sizes of one run of the study."""

    keys: int
    warmup: int
    measured: int


FULL = Workload(keys=100_000, warmup=20_000, measured=512)
QUICK = Workload(keys=10_000, warmup=1_200, measured=64)

_BATCHES: dict[Workload, list[tuple[bytes, ...]]] = {}


def batches(w: Workload) -> list[tuple[bytes, ...]]:
    """The seeded stream of write batches (distinct keys each), made once."""
    if w not in _BATCHES:
        rng = random.Random(SEED)
        keys = [b"key:%08d" % i for i in range(w.keys)]
        cum = list(itertools.accumulate(1.0 / (r + 1) ** ZIPF_S for r in range(w.keys)))
        _BATCHES[w] = [
            tuple(set(rng.choices(keys, cum_weights=cum, k=BATCH_DRAWS)))
            for _ in range(w.warmup + w.measured)
        ]
    return _BATCHES[w]


@dataclass
class Outcome:
    """What one (policy, queue length) run measured."""

    shipped: dict[int, int]
    needed: dict[int, int]
    push_seconds: float
    persisted_keys: int
    pushes: int
    queue: VersionQueue

    def redundancy(self, lag: int) -> float:
        """Keys shipped per key needed at ``lag``."""
        return self.shipped[lag] / self.needed[lag]

    def push_us(self) -> float:
        """Mean microseconds per measured push."""
        return self.push_seconds / self.pushes * 1e6

    def persisted_per_push(self) -> float:
        """Mean keys in ``QueueDelta.added`` per measured push."""
        return self.persisted_keys / self.pushes


def oldest_first_state(stream: list[tuple[bytes, ...]], n: int, max_entries: int) -> VersionQueue:
    """The queue oldest-first reaches after pushing ``stream[:n]`` (all batches
    non-empty): the oldest ``n - max_entries + 1`` batches merged into one entry
    and the rest exact. Built directly because pushing would rewrite that
    entry on every batch; tests/test_version_queue.py checks the equivalence."""
    entries = [Entry(v, frozenset(stream[v - 1])) for v in range(1, n + 1)]
    if n > max_entries:
        cut = n - max_entries + 1
        blob = Entry(cut, frozenset().union(*stream[:cut]))
        entries = [blob, *entries[cut:]]
    return VersionQueue.from_entries(
        EPOCH, 0, n, entries, max_entries=max_entries, policy=OldestFirstPolicy()
    )


def run(name: str, factory: Callable[[], MergePolicy], max_entries: int, w: Workload) -> Outcome:
    """Push the workload through a fresh queue and measure every lag."""
    stream = batches(w)
    max_lag = max(LAGS)
    first = 1
    if name == OldestFirstPolicy.name:
        first = w.warmup - max_lag + 1
        q = oldest_first_state(stream, first - 1, max_entries)
    else:
        q = VersionQueue(EPOCH, max_entries=max_entries, policy=factory())
    recent: list[tuple[bytes, ...]] = []  # the last max_lag batches
    window = {lag: Counter[bytes]() for lag in LAGS}
    shipped = dict.fromkeys(LAGS, 0)
    needed = dict.fromkeys(LAGS, 0)
    push_seconds = 0.0
    persisted = 0
    for v in range(first, w.warmup + w.measured + 1):
        batch = stream[v - 1]
        keys = frozenset(batch)
        measuring = v > w.warmup
        if measuring:
            start = time.perf_counter()
            delta = q.push(v, keys)
            push_seconds += time.perf_counter() - start
            persisted += sum(len(e.keys) for e in delta.added)
        else:
            q.push(v, keys)
        if v <= w.warmup - max_lag:
            continue
        recent.append(batch)
        for lag, counter in window.items():
            counter.update(batch)
            if len(recent) > lag:
                gone = recent[-lag - 1]
                counter.subtract(gone)
                for k in gone:
                    if counter[k] <= 0:
                        del counter[k]
        if len(recent) > max_lag:
            del recent[0]
        if measuring:
            for lag in LAGS:
                shipped[lag] += len(q.keys_since(EPOCH, v - lag))
                needed[lag] += len(window[lag])
    return Outcome(shipped, needed, push_seconds, persisted, w.measured, q)


def _anchored(figure: str, value: float, unit: str, base: float | None) -> Row:
    if base is None:
        return Row(figure, value, unit)
    return Row(figure, value, unit, anchor=base, anchor_name="halving")


def rows(quick: bool) -> list[Row]:
    """Redundancy per policy, queue length and lag; push and read costs."""
    w = QUICK if quick else FULL
    out: list[Row] = []
    cost: dict[str, Outcome] = {}
    for max_entries in QUEUE_LENGTHS:
        results = {name: run(name, f, max_entries, w) for name, f in POLICIES.items()}
        base = results[HalvingPolicy.name]
        for lag in LAGS:
            for name, res in results.items():
                anchor = None if res is base else round(base.redundancy(lag), 3)
                figure = f"redundancy {name} q={max_entries} lag={lag}"
                out.append(_anchored(figure, round(res.redundancy(lag), 3), "x", anchor))
        if max_entries == COST_QUEUE_LENGTH:
            cost = results
    base = cost[HalvingPolicy.name]
    for name, res in cost.items():
        suffix = f"{name} q={COST_QUEUE_LENGTH}"
        anchor = None if res is base else round(base.push_us(), 2)
        out.append(_anchored(f"push {suffix}", round(res.push_us(), 2), "us", anchor))
        anchor = None if res is base else round(base.persisted_per_push(), 1)
        value = round(res.persisted_per_push(), 1)
        out.append(_anchored(f"persisted keys per push {suffix}", value, "keys", anchor))
        for lag in (1, 100):
            queue = res.queue
            since = queue.version - lag
            seconds = median_time(
                lambda queue=queue, since=since: queue.keys_since(EPOCH, since),  # type: ignore[misc]
                number=50 if quick else 200,
            )
            out.append(Row(f"keys_since {suffix} lag={lag}", round(seconds * 1e6, 2), "us"))
    return out


def main(argv: list[str] | None = None) -> None:
    """Print the rows as a markdown table."""
    args = sys.argv[1:] if argv is None else argv
    quick = "--quick" in args
    print("| figure | value | unit | anchor | ratio |")
    print("|---|---|---|---|---|")
    for r in rows(quick):
        anchor = "" if r.anchor is None else f"{r.anchor} ({r.anchor_name})"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        print(f"| {r.figure} | {r.value} | {r.unit} | {anchor} | {ratio} |")


if __name__ == "__main__":
    main()
