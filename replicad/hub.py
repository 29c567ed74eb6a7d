"""Hint fan-out and the fleet view, shared by the origin and relays.

:class:`HintHub` hands out subscriptions that never block the publisher: a
subscriber keeps only the newest hint per dataset, so a slow reader of the
hint stream skips versions instead of holding anything up (hints are lossy by
design; pulls make replicas correct). The publisher may offer a
:class:`~replicad.messages.DiffPush` (a hint carrying the version's records):
subscribers that asked for diffs get it, merged with a pending push it
follows (up to ``max_push_bytes``), the others get its plain hint.
:class:`Fleet` keeps the newest ack of every replica, bounded in size.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from replicad.errors import ProtocolError
from replicad.messages import Cursor, DiffPush, Hint
from replicad.origin_types import FleetEntry

HintEvent = Hint | DiffPush


class Subscription:
    """The hints of one subscriber: newest per dataset, datasets in name
    order. A plain async iterator (not a generator): abandoning it needs no
    cleanup. With ``diffs``, pushes are kept (a newer one that follows a
    pending one is merged into it, up to ``max_push_bytes``; otherwise the
    newer replaces it and the replica pulls the gap)."""

    def __init__(
        self, names: frozenset[str] | None, *, diffs: bool = False, max_push_bytes: int = 256 << 10
    ) -> None:
        self.names = names
        self.diffs = diffs
        self.max_push_bytes = max_push_bytes
        self._pending: dict[str, HintEvent] = {}
        self._wakeup = trio.Event()

    def offer(self, event: HintEvent) -> None:
        if self.names is not None and event.dataset not in self.names:
            return
        if isinstance(event, DiffPush):
            if not self.diffs:
                event = event.hint
            else:
                pending = self._pending.get(event.dataset)
                if isinstance(pending, DiffPush):
                    event = pending.follow(event, self.max_push_bytes) or event
        self._pending[event.dataset] = event
        self._wakeup.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> HintEvent:
        while not self._pending:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
        return self._pending.pop(min(self._pending))


class HintHub:
    """Publishes hints to every open subscription."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self.published = 0

    def __len__(self) -> int:
        return len(self._subscribers)

    def publish(self, event: HintEvent) -> None:
        self.published += 1
        for sub in self._subscribers:
            sub.offer(event)

    def subscribe(
        self,
        names: frozenset[str] | None,
        current: Callable[[], Iterable[Hint]],
        *,
        diffs: bool = False,
    ) -> AbstractAsyncContextManager[AsyncIterator[HintEvent]]:
        """A subscription that first yields ``current()`` (the cursor of each
        dataset now), then every hint published while it is open (pushes
        too, with ``diffs``)."""
        return self._subscription(names, current, diffs)

    @asynccontextmanager
    async def _subscription(
        self, names: frozenset[str] | None, current: Callable[[], Iterable[Hint]], diffs: bool
    ) -> AsyncGenerator[AsyncIterator[HintEvent], None]:
        sub = Subscription(names, diffs=diffs)
        for hint in current():
            sub.offer(hint)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)


class Fleet:
    """The newest ack of each replica (at most ``limit``; the longest silent
    is forgotten first)."""

    def __init__(self, clock: Callable[[], float], limit: int = 100_000) -> None:
        self._clock = clock
        self._limit = limit
        self._entries: dict[str, FleetEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def ack(
        self, replica: str, address: str, datasets: Mapping[str, Cursor], info: Mapping[str, Any]
    ) -> None:
        """Record an ack. ProtocolError for a replica id outside 1-256 chars."""
        if not replica or len(replica) > 256:
            raise ProtocolError("replica id must be 1-256 characters")
        if len(self._entries) >= self._limit and replica not in self._entries:
            oldest = min(self._entries.values(), key=lambda e: e.last_seen)
            del self._entries[oldest.replica]
        self._entries[replica] = FleetEntry(
            replica, self._clock(), address, dict(datasets), dict(info)
        )

    def entries(self) -> list[FleetEntry]:
        return sorted(self._entries.values(), key=lambda e: e.replica)
