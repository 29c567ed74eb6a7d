"""A walk through the sync core, in one process, with nothing to set up.

An in-memory origin holds a seed-like ``user_profile`` dataset (about 30
features per user, encoded by the real record codec); an in-memory replica
follows it with the real state machine, through the real wire frames. The demo
prints what each sync shipped: the bootstrap snapshot, a diff after a few
writes, and a Merkle repair after the origin loses its history (new epoch).

This is the protocol core only. The networked origin (``replicad serve``) and
the LMDB sidecar build on exactly these pieces.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from replicad.codec import DatasetCodec
from replicad.loopback import LoopbackDriver
from replicad.memory import MemoryDataset, MemoryMirror
from replicad.messages import Hint
from replicad.replica import ReplicaSync, SyncConfig
from replicad.sample import seed_like_record, seed_like_schema


def run(records: int = 20_000, out: Callable[[str], None] = print) -> None:
    """Run the walk-through, printing with ``out``."""
    rng = random.Random(7)
    codec = DatasetCodec([seed_like_schema()])
    origin = MemoryDataset("user_profile", rng.randbytes(16))
    out(f"origin: loading {records:,} seed-like user profiles (~30 features each)")
    origin.write({b"user:%08d" % i: codec.encode(seed_like_record(i)) for i in range(records)})
    size = sum(len(v) for v in origin.records.values())
    out(f"origin: version {origin.cursor.version}, {size / records:.0f} bytes per record encoded")

    mirror = MemoryMirror()
    sync = ReplicaSync(
        "user_profile",
        state=mirror.state(),
        local=mirror,
        rng=rng,
        now=0.0,
        config=SyncConfig(snapshot_chunk=5_000),
    )

    def step(title: str) -> None:
        driver = LoopbackDriver(sync, mirror, origin)
        driver.run(0.0)
        link = driver.link
        same = mirror.live.records == origin.records and mirror.cursor == origin.cursor
        out(
            f"{title:<44} {driver.requests:>3} requests {link.bytes:>12,} bytes  "
            f"replica at v{mirror.cursor.version if mirror.cursor else '-'}  "
            f"{'== origin' if same else '!= origin'}"
        )

    step("bootstrap (snapshot stream + catch-up diff)")

    for i in range(10):
        rec = seed_like_record(i)
        rec["age"] = 20 + i
        origin.write({b"user:%08d" % i: codec.encode(rec)}, [b"user:%08d" % (records - 1 - i)])
    sync.hint(Hint("user_profile", origin.cursor, origin.digest), 0.0)
    step("10 writes + 10 deletes, then a hint (diff)")

    origin.lose_history(rng.randbytes(16))
    rec = seed_like_record(5)
    rec["city"] = "shenzhen"
    origin.write({b"user:%08d" % 5: codec.encode(rec)})
    sync.hint(Hint("user_profile", origin.cursor, origin.digest), 0.0)
    step("origin lost its history, 1 change (Merkle)")

    value = mirror.live.records[b"user:%08d" % 5]
    out(f"replica reads user:00000005 -> city={codec.decode(value)['city']!r}")
    out(f"sync stats: {sync.stats.syncs}, records applied {sync.stats.records_applied:,}")
