"""The sidecar's apply thread: one dedicated thread at a raised nice value."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import trio

from replicad.errors import ConfigError, StorageError
from sidecar.apply_thread import ApplyThread
from sidecar.config import load

LINUX = sys.platform.startswith("linux")


def _nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_calls_run_in_one_lowered_thread_and_return_or_raise() -> None:
    worker = ApplyThread(7)
    caller_nice = _nice_of_this_thread()

    def fail() -> None:
        raise StorageError("map full")

    async def main() -> None:
        seen = [await worker.run(lambda: (threading.get_ident(), _nice_of_this_thread()))]
        seen.append(await worker.run(lambda: (threading.get_ident(), _nice_of_this_thread())))
        assert seen[0] == seen[1]  # the same thread every time
        ident, nice = seen[0]
        assert ident != threading.get_ident()
        if LINUX:
            assert worker.lowered and nice == min(19, caller_nice + 7)
        assert await worker.run(sum, [1, 2, 3]) == 6
        with pytest.raises(StorageError, match="map full"):
            await worker.run(fail)
        assert await worker.run(lambda: "still serving") == "still serving"

    try:
        trio.run(main)
    finally:
        worker.close(timeout=5)
    assert _nice_of_this_thread() == caller_nice  # the caller's thread is untouched


def test_a_started_call_finishes_before_the_cancellation_is_seen() -> None:
    worker = ApplyThread(0)
    finished: list[float] = []

    def slow_apply() -> str:
        time.sleep(0.3)
        finished.append(time.monotonic())
        return "committed"

    async def main() -> None:
        with trio.move_on_after(0.05) as scope:
            # the apply outlives the deadline: its result still comes back
            assert await worker.run(slow_apply) == "committed"
            assert finished
            await trio.sleep(0)  # the next checkpoint sees the cancellation
            raise AssertionError("not cancelled")
        assert scope.cancelled_caught

    try:
        trio.run(main)
    finally:
        worker.close(timeout=5)
    assert not worker.lowered  # nice 0: left alone


def test_close_then_reuse_and_a_result_nobody_waits_for() -> None:
    worker = ApplyThread(3)

    async def ask(value: str) -> str:
        return await worker.run(lambda: value)

    assert trio.run(ask, "first") == "first"
    worker.close(timeout=5)
    assert trio.run(ask, "after close: a new thread") == "after close: a new thread"

    # a caller whose trio run ended (a KeyboardInterrupt through a shielded
    # wait) cannot be told: the thread drops the result and keeps serving
    def gone(_result: object) -> None:
        raise trio.RunFinishedError("that run is over")

    worker._jobs.put((int, (), gone))
    assert trio.run(ask, "still alive") == "still alive"
    worker.close(timeout=5)


def test_bad_settings() -> None:
    for bad in (-1, 20, 1.5):
        with pytest.raises(ValueError, match=r"0\.\.19"):
            ApplyThread(bad)  # type: ignore[arg-type]
    assert load(None, environ={"SIDECAR_DATASETS": "a", "SIDECAR_APPLY_NICE": "0"}).apply_nice == 0
    with pytest.raises(ConfigError, match="apply_nice"):
        load(None, environ={"SIDECAR_DATASETS": "a", "SIDECAR_APPLY_NICE": "20"})
