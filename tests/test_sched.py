"""sidecar.sched: a thread asking Linux's scheduler for a short time slice."""

from __future__ import annotations

import platform
import sys
import threading
from pathlib import Path

import pytest

from replicad.errors import ConfigError
from sidecar.config import load
from sidecar.sched import request_slice


def slice_of(task: str) -> int | None:
    """se.slice (ns) of a task from /proc/.../sched, None where not shown."""
    try:
        text = Path(task, "sched").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    return None


def custom_slices_supported() -> bool:
    """Linux 6.12 or later (EEVDF custom slices) on an architecture we know."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        return False
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (6, 12) and slice_of("/proc/thread-self") is not None


@pytest.mark.skipif(not custom_slices_supported(), reason="needs Linux 6.12+ custom slices")
def test_a_thread_gets_the_slice_it_asks_for_and_keeps_its_nice_value() -> None:
    seen: list[object] = []

    def body() -> None:
        import os

        before = os.getpriority(os.PRIO_PROCESS, 0)
        seen.append(request_slice(250))
        seen.append(slice_of("/proc/thread-self"))
        seen.append(os.getpriority(os.PRIO_PROCESS, 0) == before)

    default = slice_of("/proc/thread-self")
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [True, 250_000, True]
    assert slice_of("/proc/thread-self") == default  # only that thread changed


def test_zero_asks_for_nothing() -> None:
    assert request_slice(0) is False


def test_the_setting() -> None:
    env = {"SIDECAR_DATASETS": "a"}
    assert load(None, environ=env).socket_slice_us == 100
    assert load(None, environ={**env, "SIDECAR_SOCKET_SLICE_US": "0"}).socket_slice_us == 0
    for bad in ("50", "200000", "-1"):
        with pytest.raises(ConfigError, match="socket_slice_us"):
            load(None, environ={**env, "SIDECAR_SOCKET_SLICE_US": bad})
