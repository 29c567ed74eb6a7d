"""Writers and readers: the load a simulation puts on the system.

Theory of operation
-------------------
**Writers** commit batches at the origin as a Poisson process. A batch
touches a geometric number of distinct keys drawn with Zipf skew from a fixed
key space (a few hot keys change often, most rarely), writes random values
and deletes a fraction of them; now and then a *bulk replace* rewrites a part
of the dataset through ``MemoryDataset.replace_all`` (a daily reload). Every
commit is recorded in the checker's :class:`~simulations.history.OriginHistory`
(the keys whose value changed, the digest, the time) and announced with a
hint. While the origin is down, writes are refused and counted.

**Readers** model the application processes on the replicas' hosts: one
Poisson process over all replicas picks a host and a dataset, reads a few
Zipf-drawn keys and the cursor straight from the mirror (as the zero-copy
reader does, so reads go on while the sidecar process is down), and hands
what it saw to the checker, which verifies it and records the staleness.

Everything is drawn from the workload's own PRNG streams.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from simulations.history import OriginHistory
from simulations.nodes import Env, OriginNode, ReplicaNode


@dataclass(frozen=True)
class WorkloadConfig:
    """The write and read load of a run."""

    keyspace: int = 400
    initial_records: int = 250
    value_size: int = 32
    """Mean value size in bytes (uniform in [size/2, 3*size/2])."""
    write_rate: float = 4.0
    """Write batches per second at the origin."""
    batch_keys: float = 4.0
    """Mean distinct keys per batch."""
    delete_fraction: float = 0.1
    bulk_probability: float = 0.005
    """Probability that a write is a bulk replace."""
    bulk_change: float = 0.2
    """Fraction of the key space a bulk replace rewrites or drops."""
    meta_probability: float = 0.002
    """Probability that a write also bumps the dataset's metadata revision."""
    zipf: float = 0.9
    read_rate: float = 1.0
    """Reads per replica per second."""
    read_keys: int = 4


class Zipf:
    """Draws ranks ``0..n-1`` with ``P(r) ~ 1 / (r + 1) ** s``."""

    def __init__(self, n: int, s: float) -> None:
        self.cum = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(n)))
        self.n = n

    def draw(self, rng: random.Random) -> int:
        i = bisect.bisect_left(self.cum, rng.random() * self.cum[-1])
        return min(i, self.n - 1)


def key_of(rank: int) -> bytes:
    return b"k%06d" % rank


class Writer:
    """Commits the write load at the origin and records it in the histories."""

    def __init__(
        self,
        env: Env,
        origin: OriginNode,
        histories: dict[str, OriginHistory],
        rng: random.Random,
        config: WorkloadConfig,
        *,
        on_write: Callable[[str, frozenset[bytes]], None] | None = None,
    ) -> None:
        self.env = env
        self.origin = origin
        self.histories = histories
        self.rng = rng
        self.config = config
        self.zipf = Zipf(config.keyspace, config.zipf)
        self.names = sorted(origin.datasets)
        self.active = False
        self.on_write = on_write
        """Called with the dataset and the keys each write touched (studies)."""

    def _value(self) -> bytes:
        n = self.config.value_size
        return self.rng.randbytes(self.rng.randint(max(1, n // 2), max(1, n * 3 // 2)))

    def initial_load(self) -> None:
        """Load ``initial_records`` keys into every dataset as its version 1."""
        for name in self.names:
            n = min(self.config.initial_records, self.config.keyspace)
            ranks = sorted(self.rng.sample(range(self.config.keyspace), n))
            self.commit(name, {key_of(r): self._value() for r in ranks}, [])

    def start(self, until: float) -> None:
        """Write as a Poisson process until simulated time ``until``."""
        self.active = True
        rate = self.config.write_rate
        if rate <= 0:
            return
        loop = self.env.loop

        def arrive() -> None:
            if not self.active or loop.now >= until:
                return
            self.write_once()
            loop.after(self.rng.expovariate(rate), arrive)

        loop.after(self.rng.expovariate(rate), arrive)

    def stop(self) -> None:
        self.active = False

    def write_once(self) -> None:
        """One write batch (or bulk replace) to a random dataset."""
        if not self.origin.up:
            self.env.metrics.writes_refused += 1
            return
        cfg = self.config
        rng = self.rng
        name = self.names[rng.randrange(len(self.names))] if len(self.names) > 1 else self.names[0]
        if rng.random() < cfg.bulk_probability:
            self._bulk(name)
            return
        n = 1
        p = 1.0 / max(1.0, cfg.batch_keys)
        while rng.random() > p and n < cfg.keyspace:
            n += 1
        keys: dict[bytes, None] = {}
        for _ in range(n * 3):
            keys[key_of(self.zipf.draw(rng))] = None
            if len(keys) >= n:
                break
        upserts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        for key in keys:
            if rng.random() < cfg.delete_fraction:
                deletes.append(key)
            else:
                upserts[key] = self._value()
        if rng.random() < cfg.meta_probability:
            self.origin.datasets[name].set_meta(b"schema-%d" % rng.randrange(1 << 30))
        self.commit(name, upserts, deletes)

    def _bulk(self, name: str) -> None:
        ds = self.origin.datasets[name]
        rng = self.rng
        records = dict(ds.records)
        changes = max(1, int(self.config.keyspace * self.config.bulk_change))
        for _ in range(changes):
            key = key_of(rng.randrange(self.config.keyspace))
            if rng.random() < 0.3:
                records.pop(key, None)
            else:
                records[key] = self._value()
        before = ds.records
        touched = sorted(set(before) | set(records))
        old = {k: before.get(k) for k in touched}
        ds.replace_all(records)
        self._record(name, old)

    def commit(self, name: str, upserts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        """Write one batch to dataset ``name``, record it and announce it."""
        ds = self.origin.datasets[name]
        old = {k: ds.records.get(k) for k in upserts}
        for k in deletes:
            old[k] = ds.records.get(k)
        ds.write(upserts, deletes)
        self._record(name, old)

    def _record(self, name: str, old: dict[bytes, bytes | None]) -> None:
        ds = self.origin.datasets[name]
        now = self.env.loop.now
        changes = {k: ds.records.get(k) for k, v in old.items() if ds.records.get(k) != v}
        self.histories[name].record(ds.cursor, changes, ds.digest, now)
        if now >= self.env.metrics.measure_from:
            self.env.metrics.writes += 1
        if self.on_write is not None:
            self.on_write(name, frozenset(old))
        self.origin.publish(name)


class Readers:
    """Application reads on the replicas' hosts, checked as they happen."""

    def __init__(
        self,
        env: Env,
        replicas: list[ReplicaNode],
        rng: random.Random,
        config: WorkloadConfig,
    ) -> None:
        self.env = env
        self.replicas = replicas
        self.rng = rng
        self.config = config
        self.zipf = Zipf(config.keyspace, config.zipf)
        self.active = False

    def start(self, until: float) -> None:
        rate = self.config.read_rate * len(self.replicas)
        if rate <= 0 or not self.replicas:
            return
        self.active = True
        loop = self.env.loop

        def arrive() -> None:
            if not self.active or loop.now >= until:
                return
            self.read_once()
            loop.after(self.rng.expovariate(rate), arrive)

        loop.after(self.rng.expovariate(rate), arrive)

    def stop(self) -> None:
        self.active = False

    def read_once(self) -> None:
        rng = self.rng
        node = self.replicas[rng.randrange(len(self.replicas))]
        ds = node.datasets[rng.randrange(len(node.datasets))]
        keys = [key_of(self.zipf.draw(rng)) for _ in range(self.config.read_keys)]
        self.env.checker.read(node.watches[ds], keys, self.env.loop.now)
