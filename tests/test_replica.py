"""The replica sync state machine against an in-memory origin, end to end
through the real responder and the real wire encoding."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicad.errors import SyncUsageError
from replicad.loopback import LoopbackDriver as Driver
from replicad.memory import MemoryDataset, MemoryMirror
from replicad.merkle import Geometry, MerkleTree
from replicad.messages import Cursor, DiffPush, Hint, MetaBlob, merge_pushes
from replicad.replica import Apply, Phase, ReplicaSync, Send, SyncConfig, Wait
from replicad.responder import ResponderConfig, respond, snapshot_chunk
from replicad.version_queue import policy_by_name

EPOCH_A = b"A" * 16
EPOCH_B = b"B" * 16
SMALL = Geometry(fanout=4, depth=3)


def make_origin(n: int = 0, *, geometry: Geometry = SMALL, **kw: Any) -> MemoryDataset:
    origin = MemoryDataset("ds", EPOCH_A, geometry=geometry, **kw)
    if n:
        origin.write({b"k%05d" % i: b"v%d" % i for i in range(n)})
    return origin


def make_replica(
    mirror: MemoryMirror, *, now: float = 0.0, seed: int = 1, **cfg: Any
) -> ReplicaSync:
    config = SyncConfig(**{"snapshot_chunk": 7, **cfg})
    return ReplicaSync(
        "ds",
        state=mirror.state(),
        local=mirror,
        rng=random.Random(seed),
        now=now,
        config=config,
    )


def connect(origin: MemoryDataset, **cfg: Any) -> tuple[MemoryMirror, ReplicaSync, Driver]:
    mirror = MemoryMirror(origin.tree.geometry)
    sync = make_replica(mirror, **cfg)
    return mirror, sync, Driver(sync, mirror, origin)


def synced(
    n: int = 0, *, geometry: Geometry = SMALL, max_keys: int | None = None, **cfg: Any
) -> tuple[MemoryDataset, MemoryMirror, ReplicaSync, Driver]:
    """An origin of ``n`` records (``make_origin``) and a replica connected
    to it (``connect``, ``cfg`` its settings) that has completed its first
    sync."""
    kw: dict[str, Any] = {} if max_keys is None else {"max_keys": max_keys}
    origin = make_origin(n, geometry=geometry, **kw)
    mirror, sync, driver = connect(origin, **cfg)
    driver.run(0.0)
    return origin, mirror, sync, driver


def assert_same(mirror: MemoryMirror, origin: MemoryDataset) -> None:
    assert mirror.live.records == origin.records
    assert mirror.cursor == origin.cursor
    assert mirror.tree.digest == origin.digest
    assert mirror.tree.root() == origin.tree.root()


def test_bootstrap_by_snapshot_in_chunks() -> None:
    origin = make_origin(50)
    mirror, sync, driver = connect(origin)
    assert not sync.ready
    wait = driver.run(0.0)
    assert_same(mirror, origin)
    assert sync.ready and sync.phase is Phase.IDLE
    assert wait.deadline == pytest.approx(sync.config.poll_interval)
    assert sync.stats.syncs == {"snapshot": 1}
    # 50 records in chunks of 7 (one stream), then the catch-up diff
    assert driver.request_kinds == ["SnapshotRequest", "DiffRequest"]


def test_bootstrap_without_streaming_asks_chunk_by_chunk() -> None:
    origin, mirror, _, driver = synced(50, snapshot_stream=False)
    assert_same(mirror, origin)
    assert driver.request_kinds == ["SnapshotRequest"] * 8 + ["DiffRequest"]


def test_empty_origin_bootstraps_to_version_zero() -> None:
    _, mirror, sync, _ = synced(0)
    assert mirror.cursor == Cursor(EPOCH_A, 0)
    assert sync.ready


def test_follows_writes_and_deletes_with_hints() -> None:
    origin, mirror, sync, driver = synced(20)
    origin.write({b"k00001": b"new", b"fresh": b"x"}, [b"k00002", b"never-existed"])
    sync.hint(Hint("ds", origin.cursor, origin.digest), 0.1)
    driver.run(0.1)
    assert_same(mirror, origin)
    assert sync.stats.syncs["diff"] == 1
    assert driver.request_kinds[-1] == "DiffRequest"


def test_without_hint_the_safety_poll_pulls() -> None:
    origin, mirror, _, driver = synced(5, poll_interval=2.0)
    origin.write({b"late": b"1"})
    wait = driver.run(1.0)  # before the poll interval: nothing
    assert wait.deadline == pytest.approx(2.0)
    assert b"late" not in mirror.live.records
    driver.run(2.0)
    assert_same(mirror, origin)


def test_hints_coalesce_into_one_pull() -> None:
    origin, mirror, sync, driver = synced(5)
    before = driver.requests
    for i in range(10):
        origin.write({b"burst%d" % i: b"x"})
        sync.hint(Hint("ds", origin.cursor, origin.digest), 0.5)
    driver.run(0.5)
    assert driver.requests == before + 1
    assert_same(mirror, origin)


def last_push(origin: MemoryDataset) -> DiffPush:
    assert origin.last_push is not None
    return origin.last_push


def test_a_push_at_our_cursor_applies_without_a_request() -> None:
    origin, mirror, sync, driver = synced(20)
    before = driver.requests
    for i in range(5):
        origin.write({b"k00001": b"new%d" % i, b"fresh%d" % i: b"x"}, [b"k%05d" % (i + 2)])
        assert sync.pushed(last_push(origin), 0.1 + i)
        driver.run(0.1 + i)
        assert_same(mirror, origin)
    assert driver.requests == before
    assert sync.stats.syncs["push"] == 5


def test_a_push_that_does_not_start_at_our_cursor_is_a_hint() -> None:
    origin, mirror, sync, driver = synced(20)
    origin.write({b"missed": b"1"})
    origin.write({b"seen": b"2"})
    assert not sync.pushed(last_push(origin), 0.1)  # a gap: since is not our cursor
    driver.run(0.1)
    assert_same(mirror, origin)
    assert driver.request_kinds[-1] == "DiffRequest"
    assert "push" not in sync.stats.syncs
    # a push for another dataset is ignored altogether
    assert not sync.pushed(DiffPush("other", origin.cursor, Cursor(EPOCH_A, 99), origin.digest), 1)
    assert driver.run(1.0).deadline is not None


def test_a_push_under_another_definition_revision_pulls_unless_it_carries_it() -> None:
    origin, mirror, sync, driver = synced(5)
    origin.set_meta(b"v2")
    origin.write({b"a": b"1"})
    assert not sync.pushed(last_push(origin), 0.1)  # revision 2, we hold 1
    driver.run(0.1)
    assert sync.meta_revision == 2 and mirror.meta == MetaBlob(2, b"v2")
    origin.set_meta(b"v3")
    origin.write({b"b": b"1"})
    push = last_push(origin)
    with_meta = DiffPush(
        push.dataset, push.since, push.cursor, push.digest, push.upserts, push.deletes, 3,
        MetaBlob(3, b"v3"),
    )  # fmt: skip
    before = driver.requests
    assert sync.pushed(with_meta, 0.2)
    driver.run(0.2)
    assert driver.requests == before and sync.meta_revision == 3
    assert_same(mirror, origin)


def test_a_push_held_across_a_failed_pull_and_a_lying_push_is_repaired() -> None:
    origin, mirror, sync, driver = synced(30)
    origin.write({b"a": b"1"})
    sync.request_pull()
    action = sync.next_action(0.1)  # a DiffRequest is now outstanding
    assert sync.pushed(last_push(origin), 0.1)  # held
    assert sync.busy
    sync.failed("dropped", 0.1)
    driver.run(5.0)
    assert_same(mirror, origin)
    assert action is not None
    # a push whose records do not produce its digest: rolled back, repaired
    origin.write({b"b": b"2"})
    push = last_push(origin)
    lie = DiffPush(
        push.dataset, push.since, push.cursor, push.digest, ((b"b", b"3"),), (), push.meta_revision
    )
    assert sync.pushed(lie, 6.0)
    driver.run(6.0)
    assert sync.stats.digest_mismatches == 1
    assert_same(mirror, origin)


def _report(mirror: MemoryMirror, sync: ReplicaSync, batch: Apply, now: float) -> None:
    """Apply the outstanding ``batch`` to ``mirror`` and report it."""
    assert mirror.apply(batch)
    sync.applied(True, now)


def _run_and_check(
    driver: Driver, mirror: MemoryMirror, origin: MemoryDataset, now: float
) -> list[str]:
    """Run the machine until it waits; the mirror must then equal the
    origin. Returns the kinds of the requests it sent meanwhile."""
    before = len(driver.request_kinds)
    driver.run(now)
    assert_same(mirror, origin)
    return driver.request_kinds[before:]


def _start_push_apply(sync: ReplicaSync, origin: MemoryDataset, now: float) -> Apply:
    """Feed the origin's last push and return its Apply, now outstanding."""
    assert sync.pushed(last_push(origin), now)
    action = sync.next_action(now)
    assert isinstance(action, Apply) and sync.busy
    return action


def _one_applying_one_held() -> tuple[MemoryDataset, MemoryMirror, ReplicaSync, Driver, Apply]:
    """A synced replica applying the push of ``a=1`` (returned, outstanding)
    while the push of ``b=2`` arrives and is held."""
    origin, mirror, sync, driver = synced(20)
    origin.write({b"a": b"1"})
    first = _start_push_apply(sync, origin, 0.1)
    origin.write({b"b": b"2"})
    assert sync.pushed(last_push(origin), 0.1)  # held
    return origin, mirror, sync, driver, first


def test_pushes_arriving_during_an_apply_are_merged_and_applied_after_it() -> None:
    origin, mirror, sync, driver = synced(20)
    before = driver.requests
    origin.write({b"k00001": b"first"})
    first = _start_push_apply(sync, origin, 0.1)
    # three versions arrive while the first is being applied
    origin.write({b"k00001": b"second", b"new": b"x"})
    assert sync.pushed(last_push(origin), 0.1)
    origin.write({b"k00003": b"y"}, [b"new", b"k00004"])
    assert sync.pushed(last_push(origin), 0.1)
    origin.write({b"new": b"back"})
    assert sync.pushed(last_push(origin), 0.1)
    assert mirror.apply(first)
    sync.applied(True, 0.1)
    merged = sync.next_action(0.1)
    assert isinstance(merged, Apply) and merged.cursor == origin.cursor
    assert dict(merged.upserts) == {b"k00001": b"second", b"k00003": b"y", b"new": b"back"}
    assert merged.deletes == (b"k00004",)
    assert mirror.apply(merged)
    sync.applied(True, 0.1)
    driver.run(0.1)
    assert_same(mirror, origin)
    assert driver.requests == before  # no pull
    assert sync.stats.syncs["push"] == 2


def test_a_held_push_already_covered_by_the_pull_in_flight_is_dropped() -> None:
    origin, mirror, sync, driver = synced(20)
    origin.write({b"a": b"1"})
    before = driver.requests
    held: list[bool] = []

    def push_during_the_pull(_: int) -> None:
        if not held:  # the write lands, and is pushed, before the pull is answered
            origin.write({b"b": b"2"})
            held.append(sync.pushed(last_push(origin), 0.1))

    driver.on_request = push_during_the_pull
    sync.request_pull()
    driver.run(0.1)
    assert held == [True]
    assert_same(mirror, origin)
    assert driver.requests == before + 1  # only the pull itself
    assert sync.stats.syncs.get("push", 0) == 0


def test_a_held_push_with_a_gap_before_it_pulls() -> None:
    origin, mirror, sync, driver = synced(20)
    origin.write({b"a": b"1"})
    first = _start_push_apply(sync, origin, 0.1)
    origin.write({b"lost": b"1"})  # its push never arrives
    origin.write({b"b": b"2"})
    assert sync.pushed(last_push(origin), 0.1)
    _report(mirror, sync, first, 0.1)
    assert _run_and_check(driver, mirror, origin, 0.1) == ["DiffRequest"]


def test_a_late_push_does_not_replace_a_newer_held_one() -> None:
    origin, mirror, sync, driver = synced(20)
    origin.write({b"a": b"1"})
    first_push = last_push(origin)
    first = _start_push_apply(sync, origin, 0.1)
    origin.write({b"b": b"2"})
    second = last_push(origin)
    assert sync.pushed(second, 0.1)
    assert not sync.pushed(second, 0.1)  # repeated: nothing newer, a hint
    assert not sync.pushed(first_push, 0.1)  # late
    _report(mirror, sync, first, 0.1)
    assert _run_and_check(driver, mirror, origin, 0.1) == []


def test_held_pushes_merge_in_one_pass_like_following_one_by_one() -> None:
    origin = make_origin(20)
    pushes = []
    for i in range(6):
        origin.write({b"k%05d" % (i % 3): b"w%d" % i, b"n%d" % i: b"x"}, [b"n%d" % (i - 1)])
        pushes.append(last_push(origin))
    one_by_one = pushes[0]
    for p in pushes[1:]:
        merged = one_by_one.follow(p)
        assert merged is not None
        one_by_one = merged
    together = merge_pushes(pushes)
    assert together.cursor == origin.cursor and together.digest == origin.digest
    assert dict(together.upserts) == dict(one_by_one.upserts)
    assert set(together.deletes) == set(one_by_one.deletes)
    assert merge_pushes(pushes[:1]) is pushes[0]


def test_a_requested_pull_survives_a_held_push_taken_first() -> None:
    origin, mirror, sync, driver, first = _one_applying_one_held()
    _report(mirror, sync, first, 0.1)
    origin.write({b"c": b"3"})  # no push or hint for this one
    sync.request_pull()
    # the held push first, then the requested pull
    assert _run_and_check(driver, mirror, origin, 0.1) == ["DiffRequest"]


def test_a_push_between_an_apply_and_the_next_action_joins_the_held_ones() -> None:
    origin, mirror, sync, driver, first = _one_applying_one_held()
    _report(mirror, sync, first, 0.1)  # idle now, the held push not yet taken
    origin.write({b"c": b"3"})
    assert sync.pushed(last_push(origin), 0.1)  # held after it, not a hint
    merged = sync.next_action(0.1)
    assert isinstance(merged, Apply) and merged.cursor == origin.cursor
    _report(mirror, sync, merged, 0.1)
    assert _run_and_check(driver, mirror, origin, 0.1) == []


def test_a_push_larger_than_the_hold_limit_is_a_hint() -> None:
    origin, mirror, sync, driver = synced(20, max_held_push_bytes=10)
    origin.write({b"a": b"1"})
    first = _start_push_apply(sync, origin, 0.1)
    origin.write({b"big": b"x" * 20})
    assert not sync.pushed(last_push(origin), 0.1)
    _report(mirror, sync, first, 0.1)
    assert _run_and_check(driver, mirror, origin, 0.1) == ["DiffRequest"]
    with pytest.raises(ValueError, match="max_held_push_bytes"):
        SyncConfig(max_held_push_bytes=-1)


def test_stale_or_foreign_hints_do_not_pull() -> None:
    origin, _, sync, driver = synced(5)
    before = driver.requests
    sync.hint(Hint("other", Cursor(EPOCH_B, 99), origin.digest), 0.1)
    sync.hint(Hint("ds", Cursor(EPOCH_A, 0), origin.digest), 0.1)
    driver.run(0.1)
    assert driver.requests == before


def test_epoch_change_repairs_with_merkle_shipping_only_differences() -> None:
    origin, mirror, sync, driver = synced(300, geometry=Geometry())
    origin.lose_history(EPOCH_B)
    origin.write({b"k00007": b"changed"}, [b"k00100"])
    applied_before = sync.stats.records_applied
    sync.hint(Hint("ds", origin.cursor, origin.digest), 1.0)
    driver.run(1.0)
    assert_same(mirror, origin)
    assert sync.stats.syncs.get("merkle") == 1
    # exactly the two differing keys were shipped (k00007 and k00100)
    assert sync.stats.records_applied - applied_before == 2
    kinds = driver.request_kinds
    start = kinds.index("MerkleNodesRequest")
    assert kinds[start:] == [
        "MerkleNodesRequest",
        "MerkleNodesRequest",
        "MerkleLeavesRequest",
        "DiffRequest",
    ]


def test_history_truncated_falls_back_to_merkle() -> None:
    origin, mirror, sync, driver = synced(40, geometry=Geometry(), max_keys=5)
    for i in range(8):  # more keys than the queue may hold: old entries go
        origin.write({b"k%05d" % i: b"again%d" % i})
    with pytest.raises(Exception):  # noqa: B017 - any CursorError subclass
        origin.keys_since(mirror.cursor)  # type: ignore[arg-type]
    sync.request_pull()
    driver.run(1.0)
    assert_same(mirror, origin)
    assert sync.stats.syncs.get("merkle") == 1


def test_too_many_differences_switch_to_snapshot() -> None:
    origin, mirror, sync, driver = synced(100)
    origin.lose_history(EPOCH_B)
    origin.replace_all({b"z%05d" % i: b"w" for i in range(100)})
    sync.request_pull()
    driver.run(1.0)
    assert_same(mirror, origin)
    assert sync.stats.syncs.get("snapshot") == 2


def test_local_divergence_detected_by_digest_and_repaired() -> None:
    origin, mirror, sync, driver = synced(60)
    # corrupt the live mirror behind the machine's back (tree kept consistent,
    # as when the tree is rebuilt from corrupted storage)
    key = b"k00003"
    old = mirror.live.records[key]
    mirror.live.records[key] = b"garbage"
    mirror.live.tree.update(key, old, b"garbage")
    mirror.live.leaves.update(key, old, b"garbage")
    origin.write({b"k00050": b"next"})
    sync.hint(Hint("ds", origin.cursor, origin.digest), 1.0)
    driver.run(1.0)
    assert sync.stats.digest_mismatches == 1
    assert_same(mirror, origin)
    assert sync.stats.syncs.get("merkle") == 1


def test_failures_back_off_with_growing_jittered_delays() -> None:
    origin = make_origin(10)
    mirror, sync, driver = connect(origin, backoff_base=1.0, backoff_max=8.0)
    driver.fail_request = lambda n: True
    delays = []
    now = 0.0
    for _ in range(6):
        wait = driver.run(now)
        assert wait.deadline is not None
        delays.append(wait.deadline - now)
        now = wait.deadline
    caps = [1, 2, 4, 8, 8, 8]
    for delay, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= delay <= cap
    driver.fail_request = None
    driver.run(now)
    assert_same(mirror, origin)
    assert sync.stats.failures == 6


def test_snapshot_resumes_after_crash_instead_of_starting_over() -> None:
    origin = make_origin(70)
    mirror = MemoryMirror(origin.tree.geometry)
    sync = make_replica(mirror, snapshot_stream=False)
    driver = Driver(sync, mirror, origin)
    # "crash" after the 4th chunk request: the machine is discarded
    driver.fail_request = lambda n: n == 5
    driver.run(0.0)
    assert mirror.progress is not None and mirror.cursor is None
    staged = len(mirror.staging.records)
    assert staged == 28
    origin.write({b"k00001": b"during-bootstrap", b"zzz": b"new"}, [b"k00069"])
    sync2 = make_replica(mirror, now=5.0, snapshot_stream=False)
    driver2 = Driver(sync2, mirror, origin)
    driver2.run(5.0)
    assert_same(mirror, origin)
    # resumed after k00027: k00028..k00068 (41, k00069 was deleted) + zzz is
    # 42 records = 6 chunks of 7, then the catch-up diff; nothing re-sent
    assert driver2.request_kinds == ["SnapshotRequest"] * 6 + ["DiffRequest"]


@pytest.mark.parametrize("stream", [False, True])
def test_writes_racing_with_a_chunked_snapshot_land_on_one_version(stream: bool) -> None:
    origin = make_origin(40)
    mirror = MemoryMirror(origin.tree.geometry)
    sync = make_replica(mirror, snapshot_stream=stream)
    driver = Driver(sync, mirror, origin)
    # a stream has one request; to race with it, crash the stream once
    driver.fail_request = lambda n: stream and n == 1

    def race(n: int) -> None:
        # rewrite a key that is already staged, and delete another
        origin.write({b"k%05d" % (n % 5): b"race%d" % n}, [b"k%05d" % (10 + n)])

    driver.on_request = race
    now = 0.0
    for _ in range(5):
        wait = driver.run(now)
        if sync.ready:
            break
        now = wait.deadline or now
    driver.on_request = None
    assert sync.ready
    assert sync.stats.digest_mismatches == 0
    assert sync.stats.syncs == {"snapshot": 1}
    assert mirror.live.records == origin.records
    assert mirror.cursor == origin.cursor


def test_usage_errors_are_local() -> None:
    origin = make_origin(3)
    _, sync, _ = connect(origin)
    with pytest.raises(SyncUsageError):
        sync.applied(True, 0.0)
    with pytest.raises(SyncUsageError):
        sync.apply_failed("x", 0.0)
    action = sync.next_action(0.0)
    assert isinstance(action, Send)
    assert sync.next_action(0.0) == Wait(None)  # one outstanding action at a time
    with pytest.raises(SyncUsageError):
        sync.applied(True, 0.0)


def test_answer_for_another_dataset_counts_as_failure() -> None:
    origin = make_origin(3)
    other = MemoryDataset("other", EPOCH_A, geometry=SMALL)
    _, sync, _ = connect(origin)
    action = sync.next_action(0.0)
    assert isinstance(action, Send)
    sync.response(snapshot_chunk(other, None, 10), 0.0)
    assert sync.stats.failures == 1
    assert "dataset" in sync.stats.last_error
    assert isinstance(sync.next_action(0.0), Wait)


def test_apply_failure_in_storage_backs_off_and_retries() -> None:
    origin, mirror, sync, driver = synced(3)
    origin.write({b"a": b"b"})
    sync.request_pull()
    assert isinstance(sync.next_action(0.0), Send)
    req = sync._outstanding
    assert isinstance(req, Send)
    sync.response(respond(origin, req.request), 0.0)
    action = sync.next_action(0.0)
    assert isinstance(action, Apply)
    sync.apply_failed("MDB_MAP_FULL", 0.0)
    assert sync.stats.last_error == "apply failed: MDB_MAP_FULL"
    wait = driver.run(0.0)
    assert wait.deadline is not None
    driver.run(wait.deadline)
    assert_same(mirror, origin)


# --- the property: whatever happens, every visible state is an origin state,
# --- and once faults stop the replica converges.

keys_st = st.sampled_from([b"k%d" % i for i in range(24)])
op_st = st.one_of(
    st.tuples(
        st.just("write"),
        st.dictionaries(keys_st, st.binary(min_size=0, max_size=4), max_size=6),
        st.lists(keys_st, max_size=3),
    ),
    st.tuples(st.just("replace"), st.dictionaries(keys_st, st.binary(max_size=3), max_size=20)),
    st.tuples(st.just("lose_history")),
    st.tuples(st.just("crash")),
    st.tuples(st.just("sync"), st.integers(min_value=0, max_value=6)),
    st.tuples(st.just("corrupt"), keys_st),
    st.tuples(st.just("push"), st.integers(min_value=0, max_value=50)),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(op_st, max_size=25),
    max_entries=st.integers(min_value=1, max_value=6),
    policy=st.sampled_from(["halving", "oldest-first", "binary-counter"]),
    stream=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_replica_only_shows_origin_states_and_converges(
    ops: list[tuple[object, ...]], max_entries: int, policy: str, stream: bool, seed: int
) -> None:
    origin = MemoryDataset(
        "ds", EPOCH_A, geometry=SMALL, max_entries=max_entries, policy=policy_by_name(policy)
    )
    history: dict[Cursor, dict[bytes, bytes]] = {origin.cursor: {}}
    epochs = iter([bytes([i]) * 16 for i in range(1, 200)])

    pushes: list[DiffPush] = []

    def record() -> None:
        history[origin.cursor] = dict(origin.records)
        if origin.last_push is not None and origin.last_push.cursor == origin.cursor:
            pushes.append(origin.last_push)

    mirror = MemoryMirror(SMALL)
    rng = random.Random(seed)

    def new_machine(now: float) -> tuple[ReplicaSync, Driver]:
        s = make_replica(mirror, now=now, seed=seed, snapshot_stream=stream, snapshot_chunk=5)
        return s, Driver(s, mirror, origin, config=ResponderConfig(max_diff_keys=15))

    sync, driver = new_machine(0.0)
    applied_seen = 0
    mismatches = 0
    corrupted = False

    def check_visible() -> None:
        nonlocal applied_seen
        if mirror.live_commits != applied_seen and mirror.cursor is not None:
            applied_seen = mirror.live_commits
            assert mirror.cursor in history, "replica shows a cursor the origin never had"
            assert mirror.live.records == history[mirror.cursor]
            assert mirror.tree.digest == _digest_of(mirror.live.records)

    now = 0.0
    for op in ops:
        now += 1.0
        match op:
            case ("write", ups, dels):
                origin.write(ups, dels)  # type: ignore[arg-type]
                record()
            case ("replace", recs):
                origin.replace_all(recs)  # type: ignore[arg-type]
                record()
            case ("lose_history",):
                origin.lose_history(next(epochs))
                record()
            case ("crash",):
                mismatches += sync.stats.digest_mismatches
                sync, driver = new_machine(now)
            case ("sync", fail_every):
                n_fail = int(fail_every)  # type: ignore[call-overload]

                def on_request(_: int, sync: ReplicaSync = sync, now: float = now) -> None:
                    if rng.random() < 0.3:
                        origin.write({b"k%d" % rng.randrange(24): b"race"})
                        record()
                        if pushes and rng.random() < 0.5:  # pushed while busy: held
                            sync.pushed(pushes[-1], now)
                    check_visible()

                driver.on_request = on_request
                driver.fail_request = _every(n_fail)
                for _ in range(3):
                    wait = driver.run(now, max_steps=2_000)
                    check_visible()
                    if wait.deadline is not None:
                        now = max(now, wait.deadline)
            case ("push", back):
                # the newest push, or a late/duplicated older one
                if pushes:
                    sync.pushed(pushes[max(0, len(pushes) - 1 - int(back) % 4)], now)  # type: ignore[call-overload]
                    wait = driver.run(now, max_steps=2_000)
                    check_visible()
            case ("corrupt", key):
                assert isinstance(key, bytes)
                k = key
                if k in mirror.live.records:
                    corrupted = True
                    old = mirror.live.records[k]
                    mirror.live.records[k] = old + b"!"
                    mirror.live.tree.update(k, old, old + b"!")
                    mirror.live.leaves.update(k, old, old + b"!")
                    applied_seen = mirror.live_commits  # check from the next commit on
    # heal: no more faults, no more writes
    driver.on_request = check_visible_noop
    driver.fail_request = None
    for _ in range(20):
        sync.request_pull()
        wait = driver.run(now, max_steps=2_000)
        now = (wait.deadline or now) + 1.0
        if mirror.cursor == origin.cursor and mirror.live.records == origin.records:
            break
    assert_same(mirror, origin)
    if not corrupted:
        # without local corruption, a digest mismatch can only mean the
        # protocol shipped a wrong state (and the check saved it)
        assert mismatches + sync.stats.digest_mismatches == 0


def _every(k: int) -> Callable[[int], bool] | None:
    """Fail every k-th request (None: never)."""
    return (lambda n: n % k == 0) if k else None


def check_visible_noop(_: int) -> None:
    return None


def _digest_of(records: dict[bytes, bytes]) -> object:
    tree = MerkleTree(SMALL)
    for k, v in records.items():
        tree.update(k, None, v)
    return tree.digest


class LyingServer:
    """Answers like the origin but always with a wrong digest."""

    def __init__(self, origin: MemoryDataset) -> None:
        from replicad.loopback import ViewServer

        self.inner = ViewServer(origin)

    def _lie(self, resp: Any) -> Any:
        from dataclasses import replace

        from replicad.merkle import Digest

        digest = getattr(resp, "digest", None)
        return replace(resp, digest=Digest(digest.count, digest.xor ^ 1)) if digest else resp

    def answer(self, request: Any) -> Any:
        return self._lie(self.inner.answer(request))

    def stream(self, request: Any) -> Any:
        return (self._lie(c) for c in self.inner.stream(request))


def test_a_server_that_always_mismatches_gets_backoff_not_a_spin() -> None:
    origin = make_origin(30)
    mirror = MemoryMirror(origin.tree.geometry)
    sync = make_replica(mirror)
    driver = Driver(sync, mirror, LyingServer(origin))
    wait = driver.run(0.0, max_steps=500)  # a spin would exhaust the steps
    assert wait.deadline is not None and wait.deadline > 0.0
    assert sync.stats.digest_mismatches >= 1
    assert mirror.cursor is None  # nothing wrong was ever committed
