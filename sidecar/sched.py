"""Asking Linux's scheduler for a short time slice (EEVDF custom slices).

Why: a socket worker wakes for a read, works for tens of microseconds and
sleeps again. When the host's cores are busy -- the sidecar decoding and
applying a large diff, the apps themselves -- the waking worker waits for
one to be handed over, and that wait is the tail of read latency. Since
Linux 6.12 the fair scheduler (EEVDF) lets a thread ask for a shorter slice
than the default (about 3 ms): its virtual deadline comes sooner, so when it
wakes it preempts a thread that has been running on a long slice instead of
waiting for that slice to end. It does not get more CPU than its share: it
gets it in smaller, earlier pieces, which is what a reader wants. No
privilege is needed (the kernel clamps the slice to 0.1-100 ms), and the
nice value is left as it is.

The call is ``sched_setattr(2)`` with ``sched_runtime`` set for
``SCHED_OTHER``; Python has no wrapper for it, so it goes through ctypes.
Older kernels accept the call and ignore the slice; other systems and
architectures without a known system call number are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger("sidecar")

_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "arm64": 274}
"""The system call's number per architecture (not in Python's os module)."""
_SCHED_OTHER = 0


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (SCHED_ATTR_SIZE_VER1, 56 bytes)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


def request_slice(microseconds: int) -> bool:
    """Ask for a time slice of ``microseconds`` for the calling thread
    (Linux, x86_64 or arm64; 0 does nothing). Returns whether the kernel
    took the request; a refusal is logged at debug level, never raised."""
    if microseconds <= 0 or not sys.platform.startswith("linux"):
        return False
    number = _SYS_SCHED_SETATTR.get(platform.machine())
    if number is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's syscall()
    tid = 0  # the calling thread
    attr = _SchedAttr(
        size=ctypes.sizeof(_SchedAttr),
        sched_policy=_SCHED_OTHER,
        sched_nice=os.getpriority(os.PRIO_PROCESS, 0),  # unchanged
        sched_runtime=microseconds * 1000,
    )
    if libc.syscall(number, tid, ctypes.byref(attr), 0) != 0:
        err = ctypes.get_errno()
        log.debug("the scheduler refused a short slice", extra={"error": os.strerror(err)})
        return False
    return True
