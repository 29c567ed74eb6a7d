"""A reader process for torn-read checks: ``python -m tests.reader_probe
MIRROR DATASET STOPFILE``: it reads until STOPFILE exists (60 s at most). It
reads whole snapshots of an opaque dataset in a
loop, where every write batch rewrote every key to the batch's version
number, so a consistent snapshot at version V holds b"V" everywhere. Prints
one JSON line: snapshots read, versions seen, and any torn snapshot found.
Every other round reads the keys with ``get_many`` instead (the reader's
cached-transaction fast path), which must be just as consistent."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from replicad.errors import ReplicadError
from replicad.messages import Cursor
from sidecar.reader import Reader


def main() -> int:
    path, dataset, stopfile = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    deadline = time.monotonic() + 60.0

    def running() -> bool:
        return time.monotonic() < deadline and not stopfile.exists()

    reader = None
    while reader is None and running():
        try:
            reader = Reader(path)
        except ReplicadError:  # the sidecar has not created the mirror yet
            time.sleep(0.01)
    while reader is not None and running():
        try:
            reader.version(dataset)
            break
        except ReplicadError:  # nor registered the dataset
            time.sleep(0.01)
    snapshots, versions, torn = 0, set(), []
    start = time.monotonic()
    timeline: list[tuple[float, int]] = []
    keys: list[bytes] = []
    cursor: Cursor | None
    while reader is not None and running():
        if snapshots % 2 and keys:
            records = reader.get_many(dataset, keys)
            found = [r for r in records if r is not None]
            if not found:
                keys = []
                continue
            cursor = found[0].cursor
            if any(r.cursor != cursor for r in found):
                torn.append({"version": cursor.version, "cursors": "differ"})
            values = {r.raw for r in found}
        else:
            with reader.snapshot() as snap:
                cursor = snap.version(dataset)
                if cursor is None:
                    continue
                keys = snap.keys(dataset, limit=10**9)
                values = {bytes(snap.raw(dataset, k) or b"") for k in keys}
        snapshots += 1
        if cursor.version not in versions:
            timeline.append((round(time.monotonic() - start, 2), cursor.version))
        versions.add(cursor.version)
        expected = {b"\x12" + str(cursor.version).encode()}  # opaque header + payload
        if values and values != expected:
            torn.append({"version": cursor.version, "values": sorted(v.hex() for v in values)[:5]})
    report = {"snapshots": snapshots, "versions": len(versions), "torn": torn[:5]}
    report["timeline"] = timeline
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
