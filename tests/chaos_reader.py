"""A reader process for the chaos test (``tests/chaos.py``): it reads one
mirror until a stop file exists and reports what it saw, for the test to check
against the digests the origin acknowledged.

``python -m tests.chaos_reader MIRROR STOPFILE DATASET=KEYS [DATASET=KEYS ...]``
where ``KEYS`` is a file holding the dataset's key universe, one hex key a
line (every key a writer may ever write). It reads for at most 600 s.

Each round reads every dataset one of two ways, alternately:

* a snapshot (one read transaction): the cursor, then every record;
* ``Reader.get_many`` over the whole key universe (the reader's cached
  transaction fast path): every record returned must carry the same cursor.

Either way it computes the digest of what it read, ``(count, XOR of entry
hashes)`` exactly as the origin does (``docs/protocol.md``), and records it
under the cursor. A whole origin version has one digest, the one the origin
returned when it acknowledged that version: so two digests under one cursor,
or a digest other than the acknowledged one, is a torn read. It also records
any cursor that went backwards within one epoch.

Prints one JSON object: ``observations`` (``"dataset epoch version"`` ->
``{digest hex: times seen}``), ``mixed_cursors`` (get_many answers whose
records disagree on the cursor), ``regressions``, ``rounds``, ``errors``
(exceptions by class name: a reader may meet a mirror being created or
a dataset not registered yet, never anything else).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

from replicad.errors import ReplicadError
from replicad.merkle import Digest, entry_hash
from replicad.messages import Cursor
from sidecar.reader import Reader

MAX_SECONDS = 600.0
PAUSE = 0.005
"""Seconds between rounds: the test machine has other processes to run."""


def digest_of(records: list[tuple[bytes, bytes]]) -> Digest:
    xor = 0
    for key, value in records:
        xor ^= entry_hash(key, value)
    return Digest(len(records), xor)


def main(argv: list[str]) -> int:
    mirror, stopfile = argv[0], Path(argv[1])
    universes: dict[str, list[bytes]] = {}
    for spec in argv[2:]:
        name, _, keys_file = spec.partition("=")
        universes[name] = [bytes.fromhex(x) for x in Path(keys_file).read_text().split()]
    deadline = time.monotonic() + MAX_SECONDS

    def running() -> bool:
        return time.monotonic() < deadline and not stopfile.exists()

    observations: dict[str, Counter[str]] = defaultdict(Counter)
    mixed: list[str] = []
    regressions: list[str] = []
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    last: dict[str, Cursor] = {}
    rounds = 0
    reader: Reader | None = None

    def observe(name: str, cursor: Cursor, records: list[tuple[bytes, bytes]]) -> None:
        digest = digest_of(records)
        observations[f"{name} {cursor.epoch.hex()} {cursor.version}"][digest.hex()] += 1
        before = last.get(name)
        if before is not None and before.epoch == cursor.epoch and cursor.version < before.version:
            regressions.append(f"{name}: {before} then {cursor}")
        last[name] = cursor

    while running():
        if reader is None:
            try:
                reader = Reader(mirror)
            except ReplicadError:  # the sidecar has not created the mirror yet
                time.sleep(0.05)
                continue
        fast = rounds % 2 == 1
        for name, universe in universes.items():
            try:
                if fast:
                    pairs = reader.get_many(name, universe)
                    cursors = {r.cursor for r in pairs if r is not None}
                    if len(cursors) > 1:
                        mixed.append(f"{name}: {sorted(str(c) for c in cursors)}")
                        continue
                    if not cursors:
                        continue
                    (cursor,) = cursors
                    records = [
                        (k, bytes(r.raw))
                        for k, r in zip(universe, pairs, strict=True)
                        if r is not None
                    ]
                    observe(name, cursor, records)
                else:
                    with reader.snapshot() as snap:
                        snap_cursor = snap.version(name)
                        if snap_cursor is None:
                            continue
                        keys = snap.keys(name, limit=10**9)
                        records = [(k, bytes(snap.raw(name, k) or b"")) for k in keys]
                    observe(name, snap_cursor, records)
            except ReplicadError as exc:  # not registered yet, say
                errors[type(exc).__name__] += 1
                if type(exc).__name__ not in first_error:
                    first_error[type(exc).__name__] = traceback.format_exc()[-1500:]
        rounds += 1
        time.sleep(PAUSE)
    if reader is not None:
        reader.close()
    report = {
        "rounds": rounds,
        "observations": {k: dict(v) for k, v in observations.items()},
        "mixed_cursors": mixed[:20],
        "regressions": regressions[:20],
        "errors": dict(errors),
        "first_error": first_error,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
