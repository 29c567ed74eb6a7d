"""The harness's discrete-event loop: one clock, one queue, no threads.

Theory of operation
-------------------
Everything that happens in a simulation -- a packet arriving, a timer firing,
a writer committing, a fault starting or healing -- is a callback scheduled at
a simulated time. :class:`EventLoop` keeps them in one binary heap ordered by
``(time, sequence number)``: the sequence number is the order in which events
were scheduled, so two events at the same instant always run in the same
order and a run is a pure function of its seed. The loop never reads a wall
clock and never yields to trio's scheduler (which is not deterministic); the
sans-IO protocol core is simply called from the callbacks.

A callback may schedule more callbacks (never in the past: a time before
``now`` is clamped to ``now``) and may call :meth:`EventLoop.stop` to end
:meth:`EventLoop.run` after it returns. Exceptions propagate out of ``run``
unchanged, with ``now`` left at the failing event's time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

Callback = Callable[[], None]


class EventLoop:
    """A deterministic discrete-event scheduler (times are seconds, floats)."""

    __slots__ = ("_heap", "_seq", "_stopped", "events", "now")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        """Callbacks run so far."""
        self._heap: list[tuple[float, int, Callback]] = []
        self._seq = 0
        self._stopped = False

    def at(self, when: float, fn: Callback) -> None:
        """Run ``fn`` at simulated time ``when`` (``now`` if ``when`` is earlier)."""
        when = max(when, self.now)
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn))

    def after(self, delay: float, fn: Callback) -> None:
        """Run ``fn`` ``delay`` seconds from now."""
        self.at(self.now + delay, fn)

    def stop(self) -> None:
        """End the current :meth:`run` once the running callback returns."""
        self._stopped = True

    @property
    def pending(self) -> int:
        """Callbacks scheduled and not yet run."""
        return len(self._heap)

    def run(self, until: float) -> bool:
        """Run callbacks in time order up to and including time ``until``.

        Returns True if :meth:`stop` ended the run early (``now`` is then the
        stopping event's time), False if the queue ran dry or the next event
        lies after ``until`` (``now`` is then ``until``).
        """
        heap = self._heap
        pop = heapq.heappop
        self._stopped = False
        while heap and heap[0][0] <= until:
            when, _, fn = pop(heap)
            self.now = when
            self.events += 1
            fn()
            if self._stopped:
                return True
        self.now = max(self.now, until)
        return False
