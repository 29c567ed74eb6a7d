"""Cursor walks over LMDB databases shared by the origin store and the
sidecar mirror (both adapters, so this module may touch LMDB objects; it
imports nothing from lmdb itself)."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any


def scan_after(
    cursor: Any, after: bytes | None, limit: int
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """Up to ``limit`` (key, value) pairs with keys after ``after`` (from the
    first when None), in key order, and the key to resume after -- None when
    the walk reached the end of the database."""
    if after is None:
        found = cursor.first()
    else:
        found = cursor.set_range(after)
        if found and cursor.key() == after:
            found = cursor.next()
    if not found:
        return [], None
    rows = [(bytes(k), bytes(v)) for k, v in islice(cursor.iternext(), limit)]
    more = cursor.next() if len(rows) == limit else False
    return rows, (rows[-1][0] if more else None)


def with_prefix(cursor: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key without the prefix, value) whose key starts with ``prefix``."""
    n = len(prefix)
    if cursor.set_range(prefix):
        for k, v in cursor:
            if k[:n] != prefix:
                return
            yield bytes(k[n:]), bytes(v)
