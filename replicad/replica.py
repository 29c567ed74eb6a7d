"""The replica's sync state machine: decisions only, no I/O, no clock.

Theory of operation
-------------------
One :class:`ReplicaSync` drives one dataset of one replica. The adapter (the
sidecar's trio loop, or the simulation's event loop) runs this cycle::

    action = sync.next_action(now)
    Send(request)   -> perform it; feed sync.response(resp, now) (a streamed
                       snapshot may feed several chunks) or sync.failed(why, now)
    Apply(batch)    -> apply it in ONE write transaction, verifying
                       batch.expected_digest before commit; then
                       sync.applied(ok, now) (ok=False: digest mismatch, rolled back)
    Wait(deadline)  -> sleep until the deadline (None: until an event), or
                       until sync.hint(hint, now) arrives

At most one action is outstanding: until its result is fed back,
``next_action`` returns ``Wait(None)``.

Phases (the transitions all live in this file):

``IDLE``
    Current as far as we know. Pull (a diff) when a hint names a newer version
    or another epoch, when the safety poll interval has passed since the last
    successful sync, or when asked to (:meth:`ReplicaSync.request_pull`).
    Without a cursor: resume a staged snapshot, repair with Merkle if the mirror
    holds data, else bootstrap with a snapshot.
``DIFF``
    A diff is in flight or being applied. ``CursorUnservable`` sends us to
    ``MERKLE`` (or ``SNAPSHOT`` when we hold no data); a digest mismatch after
    apply sends us to ``MERKLE``.
``MERKLE``
    Compare our tree with the origin's, a few levels per round trip, down to the
    exact differing keys. The first answer fixes the base cursor ``B`` (epoch
    and version at that read). Then one ``DiffRequest(since=B,
    extra_keys=differing)`` returns, in one consistent read at cursor ``C``,
    the current values of the differing keys and of every key changed after
    ``B``; applying it lands exactly on origin state ``C``: a key unchanged in
    ``(B, C]`` had one value during the whole comparison, so the comparison
    judged it right, and every key changed in ``(B, C]`` is in the diff. Too
    many differing leaves, or repeated failure, switch to ``SNAPSHOT``.
``SNAPSHOT``
    Load all records in key order into a *staging* area readers cannot see,
    chunk by chunk, persisting the resume key with each chunk (a crash resumes
    instead of starting over). The first chunk fixes the base cursor ``B``;
    resumed chunks may come from later versions of the same epoch. A final
    ``DiffRequest(since=B)`` is applied to staging and staging is promoted in
    the same transaction, which lands exactly on the diff's cursor (same
    argument as above). Another epoch mid-way restarts the snapshot.

Failures (transport errors, malformed answers, storage errors) back off with
full jitter drawn from the injected random source, and restart the phase's
current step. Everything the machine knows is in this object; the adapter
persists only what :class:`Apply` batches carry (records, cursor, digest, meta
and staging progress), which is all a restart needs.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from replicad.errors import MerkleError, ProtocolError, SyncUsageError
from replicad.merkle import (
    Digest,
    LeafAnswer,
    LeafQuery,
    LeafSource,
    MerkleComparison,
    MerkleTree,
    NodeAnswer,
)
from replicad.messages import (
    Cursor,
    CursorUnservable,
    DiffPush,
    DiffRequest,
    DiffResponse,
    Hint,
    MerkleLeavesRequest,
    MerkleLeavesResponse,
    MerkleNodesRequest,
    MerkleNodesResponse,
    MetaBlob,
    Record,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
    merge_pushes,
)


class Phase(enum.Enum):
    IDLE = "idle"
    DIFF = "diff"
    MERKLE = "merkle"
    SNAPSHOT = "snapshot"


class SyncKind(enum.Enum):
    """What kind of sync produced an applied batch (for metrics)."""

    DIFF = "diff"
    PUSH = "push"
    MERKLE = "merkle"
    SNAPSHOT = "snapshot"


class Target(enum.Enum):
    LIVE = "live"
    STAGING = "staging"


@dataclass(frozen=True)
class SnapshotProgress:
    """Persisted with every staged chunk so that a restart resumes the load.

    ``base`` is the cursor of the first chunk; ``after`` the key to resume
    after (None once every chunk is staged).
    """

    base: Cursor
    after: bytes | None


@dataclass(frozen=True)
class ReplicaState:
    """What the adapter restores from the mirror at start-up."""

    cursor: Cursor | None = None
    meta_revision: int = 0
    staging: SnapshotProgress | None = None


@dataclass(frozen=True)
class SyncConfig:
    """Tunables of the sync loop. Times are seconds on the adapter's clock."""

    poll_interval: float = 5.0
    """Pull this long after the last successful sync even without a hint."""
    backoff_base: float = 0.05
    backoff_max: float = 30.0
    snapshot_chunk: int = 20_000
    """Records per snapshot chunk (one write transaction, one fsync, each)."""
    snapshot_stream: bool = True
    """Ask for the snapshot as one stream of chunks (the adapter feeds each)."""
    merkle_levels_per_query: int = 2
    merkle_max_leaf_fraction: float = 0.25
    """Above this fraction of differing leaves, a snapshot is cheaper."""
    merkle_max_per_query: int = 4_096
    """Nodes or leaves one Merkle query may name: at most the servers'
    ``ResponderConfig.max_merkle_indices`` (the same default); more are
    asked in several queries."""
    max_merkle_attempts: int = 3
    """Merkle repairs in a row that may fail verification before a snapshot."""
    max_held_push_bytes: int = 1 << 20
    """Payload bytes of the pushes held while a sync is in flight. A push
    larger than this on its own is a hint; one that would take the held
    pushes over it replaces them (the gap then costs a pull)."""

    def __post_init__(self) -> None:
        if self.poll_interval <= 0 or self.backoff_base <= 0:
            raise ValueError("poll_interval and backoff_base must be positive")
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must be >= backoff_base")
        if self.snapshot_chunk < 1 or self.merkle_levels_per_query < 1:
            raise ValueError("snapshot_chunk and merkle_levels_per_query must be >= 1")
        if self.merkle_max_per_query < 1:
            raise ValueError("merkle_max_per_query must be >= 1")
        if self.max_held_push_bytes < 0:
            raise ValueError("max_held_push_bytes must be >= 0")


# --- actions -----------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Perform this request and feed back its response(s) or failure."""

    request: Request


@dataclass(frozen=True)
class Apply:
    """Apply in one write transaction, then report with ``applied(ok, now)``.

    * ``target`` LIVE: apply ``upserts``/``deletes`` to the live dataset (a
      delete of an absent key is a no-op), set ``cursor``, ``digest`` and
      ``meta`` (when not None); before committing, check that the live
      digest after the changes equals ``expected_digest`` and roll back
      (``ok=False``) if not.
    * ``target`` STAGING: if ``reset_staging``, first empty the staging area;
      apply the records to staging and persist ``progress`` (and ``meta``).
      If ``promote``: also check the staging digest against
      ``expected_digest``, then atomically make staging the live dataset at
      ``cursor`` (readers switch from the old content to the new in one step).
    """

    dataset: str
    kind: SyncKind
    target: Target
    upserts: tuple[Record, ...]
    deletes: tuple[bytes, ...]
    cursor: Cursor | None
    expected_digest: Digest | None
    meta: MetaBlob | None = None
    reset_staging: bool = False
    promote: bool = False
    progress: SnapshotProgress | None = None


@dataclass(frozen=True)
class Wait:
    """Nothing to do until ``deadline`` (None: until an event is fed)."""

    deadline: float | None


Action: TypeAlias = Send | Apply | Wait


@dataclass
class SyncStats:
    """Counters for metrics; the adapter reads them, never writes them."""

    requests: dict[str, int] = field(default_factory=dict)
    syncs: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    digest_mismatches: int = 0
    records_applied: int = 0
    last_error: str = ""


def _count(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


class LocalContent(Protocol):
    """The replica's live content, as the machine sees it.

    ``tree`` and ``leaves`` must describe the live dataset after every
    committed Apply, including after staging was promoted (so they are read
    through this object each time, never kept)."""

    @property
    def tree(self) -> MerkleTree: ...

    @property
    def leaves(self) -> LeafSource: ...


class ReplicaSync:
    """Sync decisions for one dataset of one replica.

    ``local`` exposes the replica's live Merkle tree and leaf listings; the
    adapter keeps them current as it applies batches (the machine reads them
    only to decide between Merkle and snapshot, and during a Merkle
    comparison). ``rng`` supplies backoff jitter. ``now`` is the adapter's
    clock in seconds.
    """

    def __init__(
        self,
        dataset: str,
        *,
        state: ReplicaState,
        local: LocalContent,
        rng: random.Random,
        now: float,
        config: SyncConfig | None = None,
    ) -> None:
        self.dataset = dataset
        self.config = config or SyncConfig()
        self._local = local
        self._rng = rng
        self.cursor: Cursor | None = state.cursor
        self.meta_revision = state.meta_revision
        self.stats = SyncStats()
        self.phase = Phase.IDLE
        self.ready = False
        """True once a sync has completed in this process's lifetime."""
        self.last_sync: float | None = None
        """Adapter time of the last successful sync (None before the first)."""
        self.origin_cursor: Cursor | None = None
        """The newest origin cursor learned from hints and responses."""

        self._staging: SnapshotProgress | None = state.staging
        self._outstanding: Send | Apply | None = None
        self._pending: Send | Apply | None = None
        self._retry_at: float | None = None
        self._failures_in_row = 0
        self._pull_wanted = False
        self._next_poll = now
        self._merkle: MerkleComparison | None = None
        self._merkle_base: Cursor | None = None
        self._merkle_attempts = 0
        self._mismatches_in_row = 0
        self._streaming = False
        self._held: list[DiffPush] = []
        """Pushes that arrived while busy, each starting where the one
        before it ends (see :meth:`pushed`); ``_held_bytes`` their payload."""
        self._held_bytes = 0
        self._pull_requested = False

    # ------------------------------------------------------------------ API

    def next_action(self, now: float) -> Action:
        """Return what the adapter should do now.

        Returns ``Wait(None)`` while a Send or Apply is outstanding. Never
        raises for conditions caused by the peer; those become failures.
        """
        if self._outstanding is not None:
            return Wait(None)
        if self._pending is not None:
            self._outstanding, self._pending = self._pending, None
            if isinstance(self._outstanding, Send):
                _count(self.stats.requests, type(self._outstanding.request).__name__)
            return self._outstanding
        if self._retry_at is not None:
            if now < self._retry_at:
                return Wait(self._retry_at)
            self._retry_at = None
            self._restart_step()
        elif self.phase is Phase.IDLE and not self._take_held():
            if self.cursor is None:
                self._begin_initial()
            elif self._pull_wanted or now >= self._next_poll:
                self._begin_diff()
            else:
                return Wait(self._next_poll)
        if self._pending is None:  # the phase is waiting on a stream
            return Wait(None)
        return self.next_action(now)

    def hint(self, hint: Hint, now: float) -> None:
        """Feed a push hint. Lossy and advisory: it only triggers a pull."""
        if hint.dataset != self.dataset:
            return
        self._learn(hint.cursor)
        if (
            self.cursor is None
            or hint.cursor.epoch != self.cursor.epoch
            or hint.cursor.version > self.cursor.version
        ):
            self._pull_wanted = True
        elif hint.cursor.version == self.cursor.version and hint.digest != self.digest:
            self._pull_wanted = True  # same version, other content: verify

    def pushed(self, push: DiffPush, now: float) -> bool:
        """Feed a pushed diff (a hint carrying its records). Taken -- the
        next action is its Apply -- when the machine is idle at exactly
        ``push.since`` with the push's definition revision (or the push
        carries the definition). Held when the machine is busy with a sync
        (an apply or a pull in flight) that may end where the push starts:
        the pushes that follow it are held after it (up to
        ``SyncConfig.max_held_push_bytes`` in all) and, once the machine is
        idle, those not yet covered are merged into one Apply if they start
        exactly at the cursor then. Anything else is treated as a hint, so
        a gap or a race only costs a pull. Returns True when taken or held."""
        if push.dataset != self.dataset:
            return False
        self._learn(push.cursor)
        if not self._held and self._take_push(push):
            return True
        if self._hold(push):
            return True
        self.hint(push.hint, now)
        return False

    def _hold(self, push: DiffPush) -> bool:
        """Keep ``push`` for when the sync in flight ends (see :meth:`pushed`)."""
        cursor = self.cursor
        if (
            cursor is None
            or self._retry_at is not None
            or push.since.epoch != cursor.epoch
            or push.since.version < cursor.version
        ):
            return False
        limit = self.config.max_held_push_bytes
        held = self._held
        if held:
            last = held[-1]
            if push.since == last.cursor and self._held_bytes + push.size <= limit:
                held.append(push)
                self._held_bytes += push.size
                return True
            if (
                push.cursor.epoch == last.cursor.epoch
                and push.cursor.version <= last.cursor.version
            ):
                return False  # late or repeated: nothing newer
        elif self._outstanding is None and self._pending is None:
            return False  # idle: nothing to wait for
        if push.size > limit:
            return False
        # newer than what was held (a gap, or over the limit): start again
        self._held, self._held_bytes = [push], push.size
        return True

    def _take_held(self) -> bool:
        """Once idle: take the held pushes not yet covered, merged, if they
        start at the cursor (True: their Apply is next). Otherwise drop
        them: ``_finish`` has already asked for a pull if the origin is
        ahead (the pushes' cursors were learned when they arrived)."""
        held, self._held, self._held_bytes = self._held, [], 0
        cursor = self.cursor
        if not held or cursor is None:
            return False
        chain = [
            p for p in held if p.cursor.epoch == cursor.epoch and p.cursor.version > cursor.version
        ]
        return bool(chain) and chain[0].since == cursor and self._take_push(merge_pushes(chain))

    def _take_push(self, push: DiffPush) -> bool:
        """Make ``push`` the next Apply if the machine is idle exactly at its
        start (see :meth:`pushed`)."""
        if (
            self.phase is Phase.IDLE
            and self._outstanding is None
            and self._pending is None
            and self._retry_at is None
            and self.cursor == push.since
            and (push.meta is not None or push.meta_revision == self.meta_revision)
        ):
            self.phase = Phase.DIFF
            self._pending = Apply(
                self.dataset,
                SyncKind.PUSH,
                Target.LIVE,
                push.upserts,
                push.deletes,
                push.cursor,
                push.digest,
                meta=push.meta,
            )
            return True
        return False

    def request_pull(self) -> None:
        """Ask for a pull at the next opportunity (e.g. an anti-entropy tick);
        a sync that ends meanwhile does not cancel it, only a pull does."""
        self._pull_wanted = True
        self._pull_requested = True

    def response(self, resp: Response, now: float) -> None:
        """Feed the answer to the outstanding request.

        A streamed snapshot feeds one chunk at a time, each after the previous
        chunk's Apply was reported. An answer that does not fit the request
        counts as a failure (backoff, then the step is retried).
        """
        out = self._outstanding
        streaming_chunk = out is None and self._streaming and self.phase is Phase.SNAPSHOT
        if not (isinstance(out, Send) or streaming_chunk):
            raise SyncUsageError("response() without an outstanding request or open stream")
        self._outstanding = None
        try:
            if resp.dataset != self.dataset:
                raise ProtocolError(f"answer for dataset {resp.dataset!r}")
            self._learn(resp.cursor)
            self._on_response(resp, now)
        except (ProtocolError, MerkleError) as exc:
            self._fail(now, f"bad answer: {exc}")
        # the failure streak ends with progress (a committed apply), not with
        # an answer: a step that fails after a good answer (an apply on a
        # full disk, a refused next query) must keep backing off

    def failed(self, reason: str, now: float) -> None:
        """The outstanding request (or snapshot stream) failed. Back off."""
        if isinstance(self._outstanding, Apply):
            raise SyncUsageError("failed() while an Apply is outstanding; use apply_failed()")
        self._outstanding = None
        self._streaming = False
        self._fail(now, reason)

    def applied(self, ok: bool, now: float) -> None:
        """Report the outstanding Apply: committed (``ok``) or rolled back
        because the digest did not match."""
        batch = self._outstanding
        if not isinstance(batch, Apply):
            raise SyncUsageError("applied() without an outstanding Apply")
        self._outstanding = None
        if not ok:
            self.stats.digest_mismatches += 1
            self._on_mismatch(batch, now)
            return
        self._failures_in_row = 0
        self.stats.records_applied += len(batch.upserts) + len(batch.deletes)
        if batch.meta is not None:
            self.meta_revision = batch.meta.revision
        if batch.target is Target.STAGING:
            self._staging = None if batch.promote else batch.progress
        if batch.cursor is not None and (batch.target is Target.LIVE or batch.promote):
            self.cursor = batch.cursor
            self._finish(batch.kind, now)
        elif self.phase is Phase.SNAPSHOT and not self._streaming:
            self._snapshot_step()

    def apply_failed(self, reason: str, now: float) -> None:
        """The outstanding Apply failed in storage (rolled back). Back off."""
        if not isinstance(self._outstanding, Apply):
            raise SyncUsageError("apply_failed() without an outstanding Apply")
        self._outstanding = None
        self._streaming = False
        self._fail(now, f"apply failed: {reason}")

    @property
    def digest(self) -> Digest:
        """The live content's digest, read from the local tree."""
        return self._local.tree.digest

    @property
    def streaming(self) -> bool:
        """True while the machine accepts further chunks of a snapshot
        stream; when it turns False mid-stream, the adapter drops the stream."""
        return self._streaming and self.phase is Phase.SNAPSHOT

    @property
    def busy(self) -> bool:
        """True while an action is outstanding."""
        return self._outstanding is not None

    # ------------------------------------------------------------ internals

    def _learn(self, cursor: Cursor) -> None:
        o = self.origin_cursor
        if o is None or o.epoch != cursor.epoch or cursor.version > o.version:
            self.origin_cursor = cursor

    def _send(self, request: Request) -> None:
        self._pending = Send(request)

    def _fail(self, now: float, reason: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = reason
        self._failures_in_row += 1
        cap = min(
            self.config.backoff_max, self.config.backoff_base * 2 ** (self._failures_in_row - 1)
        )
        self._retry_at = now + self._rng.uniform(cap / 2, cap)
        self._pending = None
        self._streaming = False

    def _finish(self, kind: SyncKind, now: float) -> None:
        _count(self.stats.syncs, kind.value)
        self.phase = Phase.IDLE
        self.ready = True
        self.last_sync = now
        self._next_poll = now + self.config.poll_interval
        self._merkle = None
        self._merkle_base = None
        self._merkle_attempts = 0
        self._mismatches_in_row = 0
        self._streaming = False
        o = self.origin_cursor
        if (
            o is not None
            and self.cursor is not None
            and (o.epoch != self.cursor.epoch or o.version > self.cursor.version)
        ):
            self._pull_wanted = True  # a hint arrived while we were busy
        else:
            self._pull_wanted = self._pull_requested

    def _restart_step(self) -> None:
        """After a backoff: retry the current phase's step from durable state."""
        if self.phase is Phase.SNAPSHOT:
            self._snapshot_step()
        elif self.phase is Phase.MERKLE:
            self._begin_merkle()
        else:
            self.phase = Phase.IDLE
            if self.cursor is None:
                self._begin_initial()
            else:
                self._begin_diff()

    def _begin_initial(self) -> None:
        if self._staging is not None or self.digest.count == 0:
            self._begin_snapshot(fresh=self._staging is None)
        else:
            self._begin_merkle()

    def _begin_diff(self) -> None:
        assert self.cursor is not None
        self.phase = Phase.DIFF
        self._pull_wanted = self._pull_requested = False
        self._send(DiffRequest(self.dataset, self.cursor, self.meta_revision))

    # --- snapshot

    def _begin_snapshot(self, *, fresh: bool) -> None:
        self.phase = Phase.SNAPSHOT
        self._merkle = None
        if fresh:
            self._staging = None
        self._snapshot_step()

    def _snapshot_step(self) -> None:
        progress = self._staging
        if progress is not None and progress.after is None:
            # every chunk is staged: catch up from the base and promote
            self._send(DiffRequest(self.dataset, progress.base, self.meta_revision))
            return
        after = None if progress is None else progress.after
        self._streaming = self.config.snapshot_stream
        self._send(
            SnapshotRequest(self.dataset, after, self.config.snapshot_chunk, self._streaming)
        )

    def _on_chunk(self, chunk: SnapshotChunk) -> None:
        progress = self._staging
        if progress is not None and progress.base.epoch != chunk.cursor.epoch:
            # the origin changed epoch under a resumed load: start over
            self._staging = None
            self._streaming = False
            self._snapshot_step()
            return
        reset = progress is None
        base = chunk.cursor if progress is None else progress.base
        new_progress = SnapshotProgress(base, chunk.next_after)
        self._pending = Apply(
            self.dataset,
            SyncKind.SNAPSHOT,
            Target.STAGING,
            chunk.records,
            (),
            None,
            None,
            meta=chunk.meta,
            reset_staging=reset,
            progress=new_progress,
        )
        if chunk.next_after is None:
            # the Apply is followed by the catch-up diff (see applied())
            self._streaming = False

    # --- merkle

    def _begin_merkle(self) -> None:
        self.phase = Phase.MERKLE
        tree = self._local.tree
        self._merkle = MerkleComparison(
            tree,
            self._local.leaves,
            levels_per_query=self.config.merkle_levels_per_query,
            max_leaves=max(1, int(tree.geometry.leaves * self.config.merkle_max_leaf_fraction)),
            max_per_query=self.config.merkle_max_per_query,
        )
        self._merkle_base = None
        self._merkle_step()

    def _merkle_step(self) -> None:
        cmp = self._merkle
        assert cmp is not None
        if cmp.too_many:
            self._begin_snapshot(fresh=True)
            return
        query = cmp.next_query()
        if isinstance(query, LeafQuery):
            self._send(MerkleLeavesRequest(self.dataset, query))
        elif query is not None:
            self._send(MerkleNodesRequest(self.dataset, query))
        else:
            assert self._merkle_base is not None
            self._send(
                DiffRequest(
                    self.dataset,
                    self._merkle_base,
                    self.meta_revision,
                    tuple(sorted(cmp.differing_keys)),
                )
            )

    def _on_merkle_answer(self, cursor: Cursor, answer: NodeAnswer | LeafAnswer) -> None:
        cmp = self._merkle
        if cmp is None:
            raise ProtocolError("Merkle answer outside a Merkle repair")
        if self._merkle_base is None:
            self._merkle_base = cursor
        elif cursor.epoch != self._merkle_base.epoch:
            self._begin_merkle()  # epoch changed mid-comparison: start again
            return
        cmp.feed(answer)
        self._merkle_step()

    # --- responses

    def _on_response(self, resp: Response, now: float) -> None:
        match resp:
            case DiffResponse():
                self._on_diff(resp, now)
            case CursorUnservable():
                self._on_unservable(resp)
            case SnapshotChunk():
                if self.phase is not Phase.SNAPSHOT:
                    raise ProtocolError("snapshot chunk outside a snapshot")
                self._on_chunk(resp)
            case MerkleNodesResponse():
                g = self._local.tree.geometry
                if resp.geometry != (g.fanout, g.depth):
                    self._begin_snapshot(fresh=True)  # trees cannot be compared
                    return
                self._on_merkle_answer(resp.cursor, resp.answer)
            case MerkleLeavesResponse():
                self._on_merkle_answer(resp.cursor, resp.answer)

    def _on_unservable(self, resp: CursorUnservable) -> None:
        if self.phase is Phase.SNAPSHOT or self._local.tree.digest.count == 0:
            self._begin_snapshot(fresh=True)
        elif self.phase is Phase.MERKLE:
            # The repair's closing diff was refused. In the same epoch the
            # refusal will repeat (too large, or history gone): a snapshot is
            # the way forward. In a new epoch, compare again, a bounded
            # number of times.
            base = self._merkle_base
            self._merkle_attempts += 1
            same_epoch = base is not None and base.epoch == resp.cursor.epoch
            if same_epoch or self._merkle_attempts >= self.config.max_merkle_attempts:
                self._begin_snapshot(fresh=True)
            else:
                self._begin_merkle()
        else:
            self._begin_merkle()

    def _on_diff(self, resp: DiffResponse, now: float) -> None:
        if self.phase is Phase.SNAPSHOT:
            progress = self._staging
            if progress is None or progress.after is not None:
                raise ProtocolError("diff during snapshot before all chunks were staged")
            self._check_forward(progress.base, resp.cursor)
            self._pending = Apply(
                self.dataset,
                SyncKind.SNAPSHOT,
                Target.STAGING,
                resp.upserts,
                resp.deletes,
                resp.cursor,
                resp.digest,
                meta=resp.meta,
                promote=True,
            )
            return
        if self.phase is Phase.MERKLE:
            cmp = self._merkle
            if cmp is None or not cmp.done or self._merkle_base is None:
                raise ProtocolError("diff during Merkle repair before the comparison ended")
            self._check_forward(self._merkle_base, resp.cursor)
            self._pending = Apply(
                self.dataset,
                SyncKind.MERKLE,
                Target.LIVE,
                resp.upserts,
                resp.deletes,
                resp.cursor,
                resp.digest,
                meta=resp.meta,
            )
            return
        if self.phase is not Phase.DIFF or self.cursor is None:
            raise ProtocolError("unexpected diff")
        self._check_forward(self.cursor, resp.cursor)
        nothing_new = not resp.upserts and not resp.deletes and resp.meta is None
        if nothing_new and resp.cursor == self.cursor and resp.digest == self.digest:
            self._finish(SyncKind.DIFF, now)
            return
        self._pending = Apply(
            self.dataset,
            SyncKind.DIFF,
            Target.LIVE,
            resp.upserts,
            resp.deletes,
            resp.cursor,
            resp.digest,
            meta=resp.meta,
        )

    @staticmethod
    def _check_forward(since: Cursor, to: Cursor) -> None:
        if to.epoch != since.epoch or to.version < since.version:
            raise ProtocolError(f"diff from {since} answered with cursor {to}")

    def _on_mismatch(self, batch: Apply, now: float) -> None:
        reason = f"digest mismatch applying {batch.kind.value} batch"
        self.stats.last_error = reason
        self._mismatches_in_row += 1
        if batch.promote:
            self._staging = None
            self._begin_snapshot(fresh=True)
        elif self.phase is Phase.MERKLE and (
            self._merkle_attempts + 1 >= self.config.max_merkle_attempts
        ):
            self._merkle_attempts += 1
            self._begin_snapshot(fresh=True)
        else:
            if self.phase is Phase.MERKLE:
                self._merkle_attempts += 1
            self._begin_merkle()
        if self._mismatches_in_row > 1:
            # the first mismatch is repaired at once; repeated ones (a faulty
            # server, a corrupting disk) back off like failures, from the
            # phase just chosen, instead of spinning
            self._fail(now, reason)
