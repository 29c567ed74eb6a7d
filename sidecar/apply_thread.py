"""One long-lived thread, at a lower CPU priority, that runs the mirror's large applies.

Why: applying a large diff or a snapshot chunk is seconds of CPU. On a small
host the socket's reader processes and the apps themselves share the cores
with it, and a read that waits for a core waits for the whole time slice.
Running every apply in one thread whose nice value is raised (Linux keeps a
nice value per thread) lets the scheduler hand a core to a waking reader
first; the apply takes the idle time. The cost is applies that run slower
only while readers are busy. The agent sends only large batches here (see
``sidecar.agent.LARGE_BATCH``): a version of a few records (most pushed
versions) applies in a millisecond at full priority, and making it wait
behind a busy host would only delay propagation -- except that it still
waits for the mirror's write lock if a large apply of another dataset holds
it (LMDB has one writer), and that apply now runs at the lower priority.

Who gets the core first: the sidecar's own socket workers and any process
the scheduler weighs against the sidecar's threads. With autogroup or
cgroups (an app in its own container), the kernel first shares the CPU
between groups, and a nice value only ranks threads within one; then the
app's share does not depend on this setting.

One thread is enough: LMDB has one writer at a time anyway, so applies of
different datasets already ran one after another.

Raising a thread's nice value needs no privilege, lowering it does: the
thread is never reused for anything else. On systems where nice values are
per process (not Linux), the value is left alone (the whole sidecar, socket
workers it starts included, would slow down).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger("sidecar")

T = TypeVar("T")

_STOP = object()


def lower_this_thread(nice: int) -> bool:
    """Raise the calling thread's nice value by ``nice`` (Linux only).

    Returns whether it was changed; a refusal is logged, never raised.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:
        log.warning("could not lower the apply thread's priority", extra={"error": str(exc)})
        return False
    return True


class ApplyThread:
    """Runs blocking calls one at a time in a dedicated thread.

    ``await run(fn, *args)`` returns ``fn(*args)`` or raises what it raised.
    Like ``trio.to_thread.run_sync``, the wait cannot be cancelled: a call
    that started finishes (its LMDB transaction commits or rolls back) and
    its result is returned; the caller sees the cancellation at its next
    checkpoint. ``close()`` stops the thread after the calls queued before
    it; a later ``run`` starts a new one.
    """

    def __init__(self, nice: int = 10, *, name: str = "sidecar-apply") -> None:
        if type(nice) is not int or not 0 <= nice <= 19:
            raise ValueError(f"nice must be an int in 0..19, got {nice!r}")
        self.nice = nice
        self.name = name
        self.lowered = False
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _main(self, jobs: queue.SimpleQueue[Any]) -> None:
        self.lowered = lower_this_thread(self.nice)
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            fn, args, deliver = job
            try:
                result: Any = (True, fn(*args))
            except BaseException as exc:  # handed to the caller, re-raised there
                result = (False, exc)
            # the caller's trio run may be gone (a KeyboardInterrupt through
            # its shielded wait): nobody waits, drop the result, keep serving
            with contextlib.suppress(trio.RunFinishedError):
                deliver(result)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:  # the first call, or the first after close()
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._main, args=(self._jobs,), name=self.name, daemon=True
            )
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[bool, Any]] = []

        def deliver(result: tuple[bool, Any]) -> None:
            box.append(result)
            token.run_sync_soon(done.set)

        self._jobs.put((fn, args, deliver))
        with trio.CancelScope(shield=True):
            await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread once the queued calls are done (waits up to
        ``timeout`` seconds for it; None: forever). A later :meth:`run`
        starts a new one."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(_STOP)
            thread.join(timeout)
