"""What a JSON view (``json_views``) costs the mirror: writes, builds, space.

Two mirrors of the same origin store (100,000 seed-like records;
``--quick``: 10,000), one keeping a JSON view of the dataset, synced by the
real machinery (origin store -> loopback -> LMDB mirror), in this process:

* **Apply**: the time ``Mirror.apply`` takes for a diff that changes every
  record, with the view (each record rendered and its row written in the
  same transaction) against the mirror without one: the anchor, the same
  diff in the same run. Three diffs, each applied to both mirrors in turn,
  median.
* **Build**: the background build after the bootstrap (``Mirror.json_step``
  until done), per record, against the bootstrap's own apply per record
  (snapshot chunks and promotion) of the same mirror; and how long each step
  holds the mirror's write lock (its write transaction, ``_json_write``:
  what a pushed version may wait for meanwhile) against the whole step,
  medians over the steps.
* **Space**: the pages the mirror's B-trees use (LMDB's page count of the
  environment's last page), with the view against without.

Rendering itself is measured by the reads benchmark's socket rows.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Row
from replicad.loopback import LoopbackDriver
from replicad.messages import Hint
from replicad.origin_types import DatasetSpec, WriteBatch
from replicad.replica import ReplicaSync
from replicad.sample import seed_like_record, seed_like_schema
from replicad.store import OriginStore
from sidecar.mirror import JSON_STEP, Mirror

DATASET = "user_profile"
STEP = 20_000


class _Synced:
    """A mirror following ``origin``, timing its applies."""

    def __init__(self, path: Path, origin: OriginStore, json: bool) -> None:
        self.mirror = Mirror(
            path, durable=False, map_size=1 << 30, json_views=[DATASET] if json else []
        )
        self.applying = 0.0
        real: Callable[[str, Any], bool] = self.mirror.apply

        def timed(name: str, batch: Any) -> bool:
            began = time.perf_counter()
            try:
                return real(name, batch)
            finally:
                self.applying += time.perf_counter() - began

        self.mirror.apply = timed  # type: ignore[method-assign]
        handle = self.mirror.ensure(DATASET)
        self.sync = ReplicaSync(
            DATASET, state=handle.state(), local=handle, rng=random.Random(1), now=0.0
        )
        self.driver = LoopbackDriver(self.sync, handle, origin)
        self.origin = origin
        self.now = 0.0

    def follow(self) -> float:
        """Sync to the origin's version; the seconds spent in apply."""
        self.applying = 0.0
        self.now += 1.0
        info = self.origin.info(DATASET)
        self.sync.hint(Hint(DATASET, info.cursor, info.digest), self.now)
        self.driver.run(self.now)
        if self.mirror.cursor(DATASET) != info.cursor:
            raise RuntimeError("the mirror did not converge")
        return self.applying

    def pages(self) -> int:
        info: dict[str, int] = self.mirror.env.info()
        return info["last_pgno"] + 1


def _write_all(origin: OriginStore, n: int, offset: int) -> None:
    for start in range(0, n, STEP):
        span = range(start, min(n, start + STEP))
        batch = {b"user:%08d" % i: seed_like_record(i + offset) for i in span}
        origin.commit([WriteBatch(DATASET, batch)])


def rows(quick: bool) -> list[Row]:
    n = 10_000 if quick else 100_000
    tmp = Path(tempfile.mkdtemp(prefix="bench-json-view-"))
    mirrors: list[_Synced] = []
    try:
        origin = OriginStore(tmp / "origin", durable=False)
        origin.create_dataset(DatasetSpec(DATASET, seed_like_schema()))
        _write_all(origin, n, 0)
        plain = _Synced(tmp / "plain", origin, json=False)
        viewed = _Synced(tmp / "viewed", origin, json=True)
        mirrors += [plain, viewed]
        plain.follow()
        bootstrap = viewed.follow()
        holds: list[float] = []
        steps: list[float] = []
        write = viewed.mirror._json_write

        def timed_write(*args: Any) -> bool:
            t0 = time.perf_counter()
            try:
                return write(*args)
            finally:
                holds.append(time.perf_counter() - t0)

        viewed.mirror._json_write = timed_write  # type: ignore[method-assign,assignment]
        began = time.perf_counter()
        more = True
        while more:
            t0 = time.perf_counter()
            more = viewed.mirror.json_step(DATASET)
            steps.append(time.perf_counter() - t0)
        build = time.perf_counter() - began
        applies: dict[str, list[float]] = {"plain": [], "viewed": []}
        for run in range(3):
            _write_all(origin, n, (run + 1) * 7919)  # every record changes
            applies["plain"].append(plain.follow())
            applies["viewed"].append(viewed.follow())
        if viewed.mirror.json_view_state(DATASET) != "built":
            raise RuntimeError("a diff emptied the view")
        with_view, without = (statistics.median(applies[k]) for k in ("viewed", "plain"))
        return [
            Row(
                f"json view: apply of a diff changing all {n:,} records, with a view (median of 3)",
                with_view,
                "s",
                anchor=without,
                anchor_name="the same diffs, a mirror without a view",
            ),
            Row(
                f"json view: background build after a bootstrap, per record ({n:,})",
                build / n * 1e6,
                "us",
                anchor=bootstrap / n * 1e6,
                anchor_name="the bootstrap's apply, per record",
            ),
            Row(
                "json view: the write lock held per build step (its write transaction, "
                f"{JSON_STEP:,} records; median of {len(holds)})",
                statistics.median(holds) * 1e3,
                "ms",
                anchor=statistics.median(steps) * 1e3,
                anchor_name="the whole step (reading and rendering outside the lock)",
            ),
            Row(
                f"json view: the mirror's pages with a view ({n:,} records)",
                viewed.pages(),
                "pages",
                anchor=plain.pages(),
                anchor_name="without a view",
            ),
        ]
    finally:
        for m in mirrors:
            m.mirror.close()
        shutil.rmtree(tmp, ignore_errors=True)
