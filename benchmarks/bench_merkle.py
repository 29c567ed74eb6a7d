"""Benchmarks of the Merkle tree: write cost, comparison round trips and bytes.

Figures:

* ``update`` per write, on an existing key (two entry hashes) and as an
  insert (one), against the bare xxh3 hashing the write cannot avoid;
* comparing a replica with an origin of N keys (1,000,000; quick: 100,000)
  that differ in 1 and in 100 keys: round trips, bytes exchanged (queries and
  answers as msgpack of their fields as lists) against shipping every
  (key, hash) pair, and keys found against the true differences;
* start-up: rebuilding a tree from N (key, value) pairs, and loading a saved
  tree; the memory of a loaded default-geometry tree.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from typing import Any

import msgpack
from xxhash import xxh3_64_intdigest, xxh3_128_intdigest

from benchmarks.common import Row, median_time
from replicad.merkle import (
    HASH_BYTES,
    LeafAnswer,
    LeafQuery,
    MemoryLeafIndex,
    MerkleComparison,
    MerkleTree,
    NodeAnswer,
    NodeQuery,
    answer_leaves,
    answer_nodes,
)

_US = 1e6


def _key(i: int) -> bytes:
    return b"user:%09d" % i


def _value(i: int, gen: int = 0) -> bytes:
    return b"feature-vector-%d-%d-0123456789abcdef" % (i, gen)


def _update_rows(quick: bool) -> list[Row]:
    n = 10_000 if quick else 100_000
    keys = [_key(i) for i in range(n)]
    old = [_value(i) for i in range(n)]
    new = [_value(i, 1) for i in range(n)]
    tree = MerkleTree()
    for k, v in zip(keys, old, strict=True):
        tree.update(k, None, v)
    forward = list(zip(keys, old, new, strict=True))
    backward = list(zip(keys, new, old, strict=True))
    upd = tree.update

    def writes() -> None:
        for k, o, w in forward:
            upd(k, o, w)
        for k, o, w in backward:
            upd(k, o, w)

    def hashing() -> None:
        for k, o, w in forward:
            m = len(k)
            xxh3_128_intdigest(k + o, m) ^ xxh3_128_intdigest(k + w, m)
            xxh3_64_intdigest(k)
        for k, o, w in backward:
            m = len(k)
            xxh3_128_intdigest(k + o, m) ^ xxh3_128_intdigest(k + w, m)
            xxh3_64_intdigest(k)

    def inserts() -> None:
        for k, o, _ in forward:
            upd(k, o, None)
        for k, o, _ in forward:
            upd(k, None, o)

    def insert_hashing() -> None:
        for k, o, _ in forward:
            xxh3_128_intdigest(k + o, len(k))
            xxh3_64_intdigest(k)
        for k, o, _ in forward:
            xxh3_128_intdigest(k + o, len(k))
            xxh3_64_intdigest(k)

    number = 1 if quick else 3
    per = 2 * n
    t_upd = median_time(writes, number=number) / per * _US
    t_hash = median_time(hashing, number=number) / per * _US
    t_ins = median_time(inserts, number=number) / per * _US
    t_ins_hash = median_time(insert_hashing, number=number) / per * _US
    return [
        Row(
            "merkle: digest update per write (existing key)",
            t_upd,
            "us",
            anchor=t_hash,
            anchor_name="the write's xxh3 hashing alone",
            target="<= 2 us",
            met=t_upd <= 2.0,
        ),
        Row(
            "merkle: digest update per write (insert or delete)",
            t_ins,
            "us",
            anchor=t_ins_hash,
            anchor_name="the write's xxh3 hashing alone",
            target="<= 2 us",
            met=t_ins <= 2.0,
        ),
    ]


def _wire_size(msg: NodeQuery | LeafQuery | NodeAnswer | LeafAnswer) -> int:
    """msgpack size of a message's fields as a list, in the message codec's layout.

    Digests of one queried node are concatenated into one byte string; a
    listing is flat ``[key, hash, key, hash, ...]`` with 16-byte hashes.
    """
    body: list[Any]
    if isinstance(msg, NodeQuery):
        body = [msg.level, list(msg.indices), msg.levels_down]
    elif isinstance(msg, LeafQuery):
        body = [list(msg.leaves)]
    elif isinstance(msg, NodeAnswer):
        body = [msg.level, msg.levels_down, [b"".join(group) for group in msg.digests]]
    else:
        body = [
            [
                [leaf, [x for k, h in listing for x in (k, h.to_bytes(HASH_BYTES, "big"))]]
                for leaf, listing in msg.entries
            ]
        ]
    return len(msgpack.packb(body))


def _run(
    replica: tuple[MerkleTree, MemoryLeafIndex], origin: tuple[MerkleTree, MemoryLeafIndex]
) -> tuple[MerkleComparison, int]:
    cmp = MerkleComparison(replica[0], replica[1])
    sent = 0
    while (q := cmp.next_query()) is not None:
        answer: NodeAnswer | LeafAnswer
        if isinstance(q, NodeQuery):
            answer = answer_nodes(origin[0], q)
        else:
            answer = answer_leaves(origin[1], q)
        sent += _wire_size(q) + _wire_size(answer)
        cmp.feed(answer)
    return cmp, sent


def _comparison_rows(quick: bool) -> list[Row]:
    n = 100_000 if quick else 1_000_000
    label = f"{n:,}"
    rnd = random.Random(20240601)
    tree = MerkleTree()
    index = MemoryLeafIndex()
    values: dict[bytes, bytes] = {}
    t0 = time.perf_counter()
    for i in range(n):
        k = _key(i)
        v = _value(i)
        values[k] = v
        tree.update(k, None, v)
        index.update(k, None, v)
    tree.root()
    build_s = time.perf_counter() - t0

    saved = tree.to_bytes()
    t0 = time.perf_counter()
    replica_tree = MerkleTree.from_bytes(saved)
    replica_tree.root()
    load_s = time.perf_counter() - t0
    replica = (replica_tree, index.copy())
    origin = (tree, index)
    full_listing = sum(len(k) + 20 for k in values)  # bin8 key + bin8 16-byte hash each

    rows: list[Row] = []
    truth: set[bytes] = set()
    victims = rnd.sample(range(n), 100)
    applied = 0
    for wanted in (1, 100):
        while applied < wanted:
            i = victims[applied]
            k = _key(i)
            kind = applied % 3
            if kind == 0:  # change a value
                new: bytes | None = _value(i, 1)
                old: bytes | None = values[k]
            elif kind == 1:  # delete a key
                new, old = None, values[k]
            else:  # insert a key the replica lacks
                k, old, new = _key(n + applied), None, _value(n + applied)
            tree.update(k, old, new)
            index.update(k, old, new)
            truth.add(k)
            applied += 1
        cmp, sent = _run(replica, origin)
        exact = cmp.differing_keys == truth and not cmp.too_many
        rows += [
            Row(
                f"merkle: round trips to find {wanted} difference(s) in {label} keys",
                cmp.round_trips,
                "round trips",
                target="<= 3",
                met=cmp.round_trips <= 3,
            ),
            Row(
                f"merkle: bytes exchanged to find {wanted} difference(s) in {label} keys",
                sent,
                "bytes",
                anchor=full_listing,
                anchor_name="every (key, hash) pair, msgpack",
            ),
            Row(
                f"merkle: keys found for {wanted} true difference(s) in {label} keys",
                len(cmp.differing_keys),
                "keys",
                anchor=len(truth),
                anchor_name="true differences",
                target="exact",
                met=exact,
            ),
        ]

    pairs = list(values.items())

    def rebuild() -> None:
        t = MerkleTree()
        upd = t.update
        for k, v in pairs:
            upd(k, None, v)
        t.root()

    rebuild_s = median_time(rebuild, number=1, repeat=3)

    tracemalloc.start()
    loaded = MerkleTree.from_bytes(saved)
    loaded.root()
    mem_mb = tracemalloc.get_traced_memory()[0] / 1e6
    tracemalloc.stop()
    del loaded

    rows += [
        Row(f"merkle: rebuild tree from {label} (key, value) pairs", rebuild_s, "s"),
        Row(f"merkle: build tree + in-memory leaf index of {label} keys", build_s, "s"),
        Row("merkle: load saved tree (default geometry, 65,536 leaves)", load_s, "s"),
        Row("merkle: memory of a loaded tree (default geometry)", mem_mb, "MB"),
    ]
    return rows


def rows(quick: bool) -> list[Row]:
    """The Merkle benchmark rows (``quick``: smaller sizes, a few seconds)."""
    return _update_rows(quick) + _comparison_rows(quick)


if __name__ == "__main__":
    import sys

    for row in rows(quick="--quick" in sys.argv):
        ratio = f"  ratio {row.ratio:.2f} vs {row.anchor_name}" if row.ratio is not None else ""
        met = "" if row.met is None else ("  met" if row.met else "  NOT MET")
        target = f"  (target {row.target})" if row.target else ""
        print(f"{row.figure}: {row.value:,.3f} {row.unit}{target}{met}{ratio}")
