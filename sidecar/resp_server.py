"""The sidecar's Redis-protocol socket: a unix socket served by reader
worker processes.

Theory of operation
-------------------
The sidecar process binds the socket file (replacing a stale one, refusing
to start when another process still listens on it), sets its mode and group,
and starts ``socket_workers`` worker processes (``python -m
sidecar.resp_server``) that inherit the listening socket. Each worker opens
the mirror read-only with :class:`sidecar.reader.Reader` -- LMDB reads scale
across processes, and a worker shares no interpreter lock with the sync
loop, so applying a large diff does not stall reads -- and runs a plain
epoll loop: accept, read, parse (:class:`sidecar.resp.CommandParser`), run
(:class:`sidecar.resp_commands.Dispatcher`), write. All the commands that
arrive in one turn of the loop, from every ready connection, run in one
read transaction, opened only if some command reads and kept for the next
turns while nothing is committed, for at most ``VIEW_MAX_AGE`` (50 ms). The
loop is a thin adapter: everything the protocol means is in the two sans-IO
modules.

Every worker watches the listening socket; the one with the fewest
connections accepts a new one (the others look away for 2 ms, and take it
if it is still waiting then), so connections spread evenly over the
workers. Limits are server-wide: the workers count their connections in a
shared memory page (one slot per worker, updated under a POSIX lock), so
``socket_max_clients`` holds across them; a connection over the limit gets
``-ERR max number of clients reached`` and is closed. A connection idle for
``socket_idle_timeout`` seconds (0: never) is closed; a request larger than
``socket_max_request_bytes``, or bytes that are not RESP, get
``-ERR Protocol error: ...`` and that connection (only) is closed. A client
that sends faster than it reads its replies is not read from while more than
1 MiB of replies waits for it.

The sidecar process pushes the sync loop's state (readiness, origin
versions, last sync times) to each worker's stdin as JSON lines, for INFO;
a worker exits when its stdin closes (the sidecar stopped or died). A worker
that dies is restarted. At a clean stop the workers get SIGTERM (they close
their connections and exit) and the socket file is removed, unless another
process replaced it meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import grp
import json
import logging
import mmap
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from replicad.errors import ConfigError, ReplicadError
from sidecar.resp import CommandParser, Error, RespError, encode
from sidecar.resp_commands import (
    Dispatcher,
    ReadView,
    ServerFacts,
    Session,
    SyncStatus,
)
from sidecar.sched import request_slice

log = logging.getLogger("sidecar.socket")

OUTPUT_HIGH_WATER = 1 << 20
"""Stop reading from a connection while this many reply bytes wait for it."""
RECV_BYTES = 256 << 10
"""Bytes one read may take from a connection, into the worker's one
reusable buffer: ``recv(RECV_BYTES)`` would allocate that much per call,
which glibc serves with mmap, mremap and munmap (10 us instead of 1) until
its threshold happens to rise."""
VIEW_MAX_AGE = 0.05
"""Seconds a worker keeps one read snapshot across turns while nothing is
committed (see :class:`_HeldView`)."""

ACCEPT_BACKOFF = 0.002
"""Seconds a worker with more connections than another ignores the listener."""
WORKER_START_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 5.0
STATUS_INTERVAL = 0.1
"""Seconds between checks for a changed sync status to push to the workers."""
_MAX_CLIENTS_REPLY = b"-ERR max number of clients reached\r\n"


@dataclass(frozen=True)
class SocketSettings:
    """The socket's settings (``socket*`` in the sidecar's configuration)."""

    path: Path
    mode: int = 0o660
    group: str | None = None
    workers: int = 2
    max_clients: int = 10_000
    idle_timeout: float = 0.0
    """Seconds; 0 keeps idle connections open (as Redis' ``timeout 0``)."""
    max_request_bytes: int = 4 << 20
    slice_us: int = 100
    """The time slice each worker asks Linux's scheduler for
    (:mod:`sidecar.sched`); 0 leaves the default."""
    view_max_age: float = VIEW_MAX_AGE
    """Seconds a worker keeps one read snapshot while nothing is committed
    (:class:`_HeldView`); 0: a new one every turn."""


# ------------------------------------------------------------------ the file


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group: no group named {group!r}") from None


def bind_unix_socket(settings: SocketSettings) -> tuple[socket.socket, os.stat_result]:
    """A listening socket at ``settings.path`` with its mode and group, and
    the file's identity (to remove only our own file later).

    A stale socket file (nothing accepts on it) is replaced; a live one, or a
    path that is not a socket, is a ConfigError, as is a group that does not
    exist or a path that cannot be bound. Nothing is left behind on error.
    """
    path = settings.path
    gid = None if settings.group is None else _group_id(settings.group)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"socket {path}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"socket {path}: the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.info("replaced a stale socket file", extra={"socket": str(path)})
        except OSError as exc:
            raise ConfigError(f"socket {path}: cannot check it: {exc.strerror or exc}") from exc
        else:
            raise ConfigError(f"socket {path}: another process is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sock.bind(str(path))
        try:
            # before listen(): nobody can connect while the mode is the umask's
            os.chmod(path, settings.mode)
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(min(socket.SOMAXCONN, 4096))
            return sock, os.stat(path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on socket {path}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise


def remove_socket_file(path: Path, identity: os.stat_result) -> bool:
    """Remove the socket file if it is still the one we bound."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != (identity.st_dev, identity.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ counters


_SLOT = struct.Struct("<5q")
"""Per worker: connected clients, connections accepted, commands processed,
connections rejected, running (1 or 0)."""


class SharedCounters:
    """Server-wide counters in one shared memory page: one slot per worker,
    written only by its worker; admission (check the total, count one more)
    runs under a POSIX record lock so the client limit is exact."""

    def __init__(self, fd: int, slots: int) -> None:
        self.fd = fd
        self.slots = slots
        self._map = mmap.mmap(fd, max(mmap.PAGESIZE, _SLOT.size * slots))

    @classmethod
    def create(cls, slots: int) -> SharedCounters:
        fd = os.memfd_create("sidecar-socket-counters", 0)
        os.ftruncate(fd, max(mmap.PAGESIZE, _SLOT.size * slots))
        return cls(fd, slots)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)

    def _get(self, slot: int) -> tuple[int, int, int, int]:
        values: tuple[int, int, int, int, int] = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        return values[:4]

    def _set(self, slot: int, values: tuple[int, int, int, int]) -> None:
        running = _SLOT.unpack_from(self._map, slot * _SLOT.size)[4]
        _SLOT.pack_into(self._map, slot * _SLOT.size, *values, running)

    def set_running(self, slot: int, running: bool) -> None:
        """Mark a worker started (by itself) or gone (by the supervisor)."""
        with self._locked():
            values = self._get(slot)
            if not running:
                values = (0, *values[1:])  # its connections are gone
            _SLOT.pack_into(self._map, slot * _SLOT.size, *values, int(running))

    def fewest_connected(self) -> int:
        """The fewest connections of a running worker."""
        counts = [
            row[0]
            for i in range(self.slots)
            if (row := _SLOT.unpack_from(self._map, i * _SLOT.size))[4]
        ]
        return min(counts, default=0)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def admit(self, slot: int, max_clients: int) -> bool:
        """Count a new connection in ``slot`` unless the server is full."""
        with self._locked():
            connected = sum(self._get(i)[0] for i in range(self.slots))
            c, total, commands, rejected = self._get(slot)
            if connected >= max_clients:
                self._set(slot, (c, total, commands, rejected + 1))
                return False
            self._set(slot, (c + 1, total + 1, commands, rejected))
            return True

    def connected(self, slot: int) -> int:
        return self._get(slot)[0]

    def release(self, slot: int, commands: int) -> None:
        """One connection of ``slot`` closed; ``commands`` more were run."""
        with self._locked():
            c, total, done, rejected = self._get(slot)
            self._set(slot, (c - 1, total, done + commands, rejected))

    def add_commands(self, slot: int, commands: int) -> None:
        with self._locked():
            c, total, done, rejected = self._get(slot)
            self._set(slot, (c, total, done + commands, rejected))

    def totals(self) -> dict[str, int | str]:
        rows = [self._get(i) for i in range(self.slots)]
        return {
            "connected_clients": sum(r[0] for r in rows),
            "io_worker_clients": ",".join(str(r[0]) for r in rows),
            "total_connections_received": sum(r[1] for r in rows),
            "total_commands_processed": sum(r[2] for r in rows),
            "rejected_connections": sum(r[3] for r in rows),
        }


# ------------------------------------------------------------------ worker


class _Conn:
    __slots__ = ("closing", "fault", "last", "out", "parser", "session", "sock")

    def __init__(self, sock: socket.socket, session: Session, max_request: int) -> None:
        self.sock = sock
        self.session = session
        self.parser = CommandParser(max_bulk=max_request, max_request=max_request)
        self.out = bytearray()
        self.last = time.monotonic()
        self.closing = False
        self.fault: RespError | None = None


class _Snapshot(ReadView, Protocol):
    """What a worker reads through (:class:`sidecar.reader.Snapshot`)."""

    def is_current(self) -> bool: ...


class _HeldView:
    """The read snapshot a turn's commands run in: begun on first use, and
    kept for later turns while it is current (nothing committed since it
    began, :meth:`sidecar.reader.Snapshot.is_current`) and younger than
    ``max_age`` seconds. Keeping it spares each turn a transaction and the
    dispatcher's per-view setup (the datasets resolved, the repliers). The
    age bound, with :meth:`expire`, caps how long an idle worker holds a
    snapshot a later commit made old (pinning pages the writer could
    reuse) and how late a staleness check of the reader would be."""

    __slots__ = ("_begin", "_checked", "_clock", "_cm", "_snap", "deadline", "max_age")

    def __init__(
        self,
        begin: Callable[[], contextlib.AbstractContextManager[_Snapshot]],
        clock: Callable[[], float],
        max_age: float,
    ) -> None:
        self._begin = begin
        self._clock = clock
        self.max_age = max_age
        self._cm: contextlib.AbstractContextManager[_Snapshot] | None = None
        self._snap: _Snapshot | None = None
        self._checked = False  # validated for this turn
        self.deadline: float | None = None
        """When the held snapshot must be let go (None: none held)."""

    def __call__(self) -> ReadView:
        snap = self._snap
        if snap is not None:
            if self._checked:
                return snap
            assert self.deadline is not None
            if self._clock() < self.deadline and snap.is_current():
                self._checked = True
                return snap
            self.end()
        cm = self._begin()
        self._snap = snap = cm.__enter__()
        self._cm = cm
        self._checked = True
        self.deadline = self._clock() + self.max_age
        return snap

    def turn_over(self) -> None:
        """The turn ended: a snapshot that is no longer current (or cannot
        be told to be) goes now; the next turn checks the one kept."""
        self._checked = False
        snap = self._snap
        if snap is not None and (self.max_age <= 0 or not snap.is_current()):
            self.end()

    def expire(self, now: float) -> None:
        """Let the snapshot go if it is past its age."""
        if self.deadline is not None and now >= self.deadline:
            self.end()

    def end(self) -> None:
        cm, self._cm, self._snap = self._cm, None, None
        self._checked = False
        self.deadline = None
        if cm is not None:
            cm.__exit__(None, None, None)


class WorkerLoop:
    """One worker's epoll loop over the shared listening socket."""

    def __init__(
        self,
        listener: socket.socket,
        dispatcher: Dispatcher,
        begin: Callable[[], contextlib.AbstractContextManager[_Snapshot]],
        counters: SharedCounters,
        slot: int,
        *,
        max_clients: int,
        idle_timeout: float,
        max_request: int,
        status_fd: int | None,
        on_status: Callable[[SyncStatus], None],
        view_max_age: float = VIEW_MAX_AGE,
    ) -> None:
        self.listener = listener
        self.dispatcher = dispatcher
        self.view = _HeldView(begin, time.monotonic, view_max_age)
        self.counters = counters
        self.slot = slot
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.max_request = max_request
        self.status_fd = status_fd
        self.on_status = on_status
        self.conns: dict[int, _Conn] = {}
        self.stopping = False
        self._ids = slot + 1
        self._id_step = max(1, counters.slots)
        self._status_buf = b""
        self._counted = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._resume_accept: float | None = None
        self._skipped = False
        self._recv_buf = bytearray(RECV_BYTES)
        self._recv_view = memoryview(self._recv_buf)
        self.ep = select.epoll()

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        ep = self.ep
        lfd = self.listener.fileno()
        self.listener.setblocking(False)
        ep.register(lfd, select.EPOLLIN)
        ep.register(self._wake_r, select.EPOLLIN)
        if self.status_fd is not None:
            os.set_blocking(self.status_fd, False)
            ep.register(self.status_fd, select.EPOLLIN)
        conns = self.conns
        sweep_every = min(1.0, self.idle_timeout / 4) if self.idle_timeout > 0 else 1.0
        next_sweep = time.monotonic() + sweep_every
        batch: list[tuple[_Conn, list[list[bytes]]]] = []
        readable, writable = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR, select.EPOLLOUT
        read = self._read
        view = self.view
        try:
            while not self.stopping:
                wake = next_sweep if self._resume_accept is None else self._resume_accept
                if view.deadline is not None and view.deadline < wake:
                    wake = view.deadline
                events = ep.poll(max(0.0, wake - time.monotonic()))
                for fd, ev in events:
                    conn = conns.get(fd)
                    if conn is not None:
                        if ev & writable:
                            self._flush(fd, conn)
                        if ev & readable:
                            read(fd, conn, batch)
                    elif fd == lfd:
                        self._accept()
                    elif fd == self.status_fd:
                        self._read_status()
                    elif fd == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                if batch:
                    self._execute(batch)
                    batch.clear()
                now = time.monotonic()
                view.expire(now)
                if self._resume_accept is not None and now >= self._resume_accept:
                    self._resume_accept = None
                    ep.modify(lfd, select.EPOLLIN)
                if now >= next_sweep:
                    next_sweep = now + sweep_every
                    self._sweep(now)
        finally:
            for fd in list(conns):
                self._close(fd)
            view.end()
            self._publish_commands()
            ep.close()

    def _execute(self, batch: list[tuple[_Conn, list[list[bytes]]]]) -> None:
        execute = self.dispatcher.execute_many
        view = self.view
        try:
            for conn, commands in batch:
                if conn.sock.fileno() < 0:
                    continue  # closed earlier in this turn
                data = execute(commands, view, conn.session)
                if conn.fault is not None and not conn.session.closing:
                    data += protocol_error(conn.fault)
                    conn.session.closing = True
                self._send(conn, data)
                if conn.session.closing:
                    conn.closing = True
                    if not conn.out:
                        self._close(conn.sock.fileno())
        except BaseException:
            view.end()  # whatever went wrong, no snapshot is kept past it
            raise
        view.turn_over()
        if self.dispatcher.commands_processed - self._counted >= 4096:
            self._publish_commands()

    @property
    def unpublished_commands(self) -> int:
        return self.dispatcher.commands_processed - self._counted

    def _publish_commands(self) -> None:
        done = self.dispatcher.commands_processed
        if done != self._counted:
            self.counters.add_commands(self.slot, done - self._counted)
            self._counted = done

    # ---------------------------------------------------------------- I/O

    def _accept(self) -> None:
        # Every worker is woken for a new connection; the one with the fewest
        # connections takes it (ties: whoever is first), so connections
        # spread evenly. The others stop watching the listener for a moment
        # rather than spin on it while it stays readable.
        counters = self.counters
        if (
            counters.slots > 1
            and not self._skipped
            and counters.connected(self.slot) > counters.fewest_connected()
        ):
            self._skipped = True
            self._resume_accept = time.monotonic() + ACCEPT_BACKOFF
            self.ep.modify(self.listener.fileno(), 0)
            return
        self._skipped = False
        for _ in range(1 if counters.slots > 1 else 64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up already
                log.warning("cannot accept a connection", extra={"error": exc.strerror})
                return
            if not self.counters.admit(self.slot, self.max_clients):
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(_MAX_CLIENTS_REPLY)
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            session = Session(id=self._ids)
            self._ids += self._id_step
            self.conns[fd] = _Conn(sock, session, self.max_request)
            self.ep.register(fd, select.EPOLLIN)

    def _read(self, fd: int, conn: _Conn, batch: list[tuple[_Conn, list[list[bytes]]]]) -> None:
        try:
            size = conn.sock.recv_into(self._recv_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if not size:
            self._close(fd)
            return
        conn.last = time.monotonic()
        if conn.closing:
            return  # QUIT or a protocol error: ignore what follows
        parser = conn.parser
        try:
            parser.receive_data(self._recv_view[:size])  # the parser copies it
            commands = parser.commands()
        except RespError as exc:
            self._send(conn, protocol_error(exc))
            conn.closing = True
            if not conn.out:
                self._close(fd)
            return
        # after a fault, the commands before it run, then the error closes
        conn.fault = parser.error
        if commands or conn.fault is not None:
            batch.append((conn, commands))

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.out:  # replies wait already: keep the order
            conn.out += data
            if len(conn.out) > OUTPUT_HIGH_WATER:
                self._watch(conn)
        else:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                conn.closing = True
                conn.out.clear()
                return
            if sent == len(data):
                return
            conn.out += data[sent:]
            self._watch(conn)

    def _flush(self, fd: int, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        del conn.out[:sent]
        if not conn.out and conn.closing:
            self._close(fd)
            return
        self._watch(conn)

    def _watch(self, conn: _Conn) -> None:
        """Wait for writability while replies are queued; stop reading while
        too many are."""
        paused = len(conn.out) > OUTPUT_HIGH_WATER
        mask = (0 if paused else select.EPOLLIN) | (select.EPOLLOUT if conn.out else 0)
        with contextlib.suppress(OSError):
            self.ep.modify(conn.sock.fileno(), mask)

    def _close(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is None:
            return
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
        conn.sock.close()
        commands = self.dispatcher.commands_processed - self._counted
        self._counted += commands
        self.counters.release(self.slot, commands)

    def _sweep(self, now: float) -> None:
        if self.idle_timeout <= 0:
            return
        limit = now - self.idle_timeout
        for fd, conn in list(self.conns.items()):
            if conn.last < limit and not conn.out:
                self._close(fd)

    def _read_status(self) -> None:
        assert self.status_fd is not None
        try:
            data = os.read(self.status_fd, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        if not data:  # the sidecar process is gone
            log.info("the sidecar process closed the status pipe; stopping")
            self.stopping = True
            return
        self._status_buf += data
        *lines, self._status_buf = self._status_buf.split(b"\n")
        for line in lines[-1:]:
            try:
                self.on_status(SyncStatus.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("bad status line from the sidecar", extra={"error": str(exc)})


def protocol_error(exc: RespError) -> bytes:
    """The reply that ends a connection sending bad RESP."""
    return encode(Error(f"ERR Protocol error: {exc}"))


# ------------------------------------------------------------------ worker process


def _worker_args(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sidecar.resp_server")
    parser.add_argument("spec", help="the worker's settings, JSON (set by the sidecar)")
    spec: dict[str, Any] = json.loads(parser.parse_args(argv).spec)
    return spec


def worker_main(argv: list[str] | None = None) -> int:
    """A socket worker process (started by :class:`SocketService`)."""
    from replicad.logs import setup_logging
    from sidecar.reader import Reader

    spec = _worker_args(argv)
    setup_logging(spec["log_format"], stream=sys.stdout)
    slot = int(spec["slot"])
    ready_fd = int(spec["ready_fd"])
    counters = SharedCounters(int(spec["counters_fd"]), int(spec["workers"]))
    listener = socket.socket(fileno=int(spec["listen_fd"]))
    try:
        reader = Reader(spec["mirror"])
    except ReplicadError as exc:
        log.error("socket worker cannot open the mirror", extra={"error": str(exc)})
        return 1
    status: list[SyncStatus | None] = [None]
    facts = ServerFacts(**{**spec["facts"], "pid": os.getpid()})
    loop: WorkerLoop | None = None

    def stats() -> dict[str, int | str]:
        totals = counters.totals()
        if loop is not None:
            done = totals["total_commands_processed"]
            assert isinstance(done, int)
            totals["total_commands_processed"] = done + loop.unpublished_commands
        return totals

    def internal_error(exc: BaseException) -> None:
        log.error("socket command failed", exc_info=exc)

    dispatcher = Dispatcher(
        facts=facts,
        datasets=reader.datasets,
        sync_status=lambda: status[0],
        stats=stats,
        clock=time.time,
        cache_entries=int(spec.get("cache_entries", 16_384)),
        on_internal_error=internal_error,
    )

    def on_status(value: SyncStatus) -> None:
        status[0] = value

    loop = WorkerLoop(
        listener,
        dispatcher,
        # bytes, not views of the map: small values formatted whole (and the
        # render cache's keys) cost less as bytes (measured: docs/benchmarks.md)
        functools.partial(reader.snapshot, buffers=False),
        counters,
        slot,
        max_clients=int(spec["max_clients"]),
        idle_timeout=float(spec["idle_timeout"]),
        max_request=int(spec["max_request_bytes"]),
        status_fd=0,
        on_status=on_status,
        view_max_age=float(spec.get("view_max_age", VIEW_MAX_AGE)),
    )
    signal.signal(signal.SIGTERM, lambda *_: loop.stop() if loop is not None else None)
    # Ctrl-C in a terminal reaches the whole process group: the sidecar
    # process handles it and stops its workers in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a reader works briefly and often: a short slice lets it preempt the
    # sync's long-running work when it wakes (sidecar/sched.py)
    request_slice(int(spec.get("slice_us", 0)))
    counters.set_running(slot, True)
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    try:
        loop.run()
    finally:
        reader.close()
        counters.close()
    return 0


# ------------------------------------------------------------------ the service


def sync_status_of(agent: Any) -> SyncStatus:
    """The agent's state as the workers' INFO shows it (call it in trio)."""
    from sidecar.resp_commands import DatasetSyncStatus

    now = time.time()
    datasets = {}
    for name, st in agent.status().items():
        since = st["seconds_since_sync"]
        datasets[name] = DatasetSyncStatus(
            ready=bool(st["ready"]),
            epoch=st["epoch"],
            version=st["version"],
            origin_version=st["origin_version"],
            lag=st["lag"],
            last_sync=None if since is None else round(now - since, 3),
            phase=str(st["phase"]),
        )
    return SyncStatus(bool(agent.ready()), datasets)


class SocketService:
    """Binds the socket and runs its worker processes (see the module doc).

    ``status`` is called in trio every :data:`STATUS_INTERVAL` seconds for
    the state pushed to the workers. :meth:`run` raises ConfigError when the
    socket cannot be bound, and ReplicadError when a worker fails to start.
    """

    def __init__(
        self,
        settings: SocketSettings,
        *,
        mirror: Path,
        status: Callable[[], SyncStatus],
        log_format: str = "json",
        sidecar_version: str = "0",
        cache_entries: int = 16_384,
    ) -> None:
        if settings.workers < 1:
            raise ConfigError("socket_workers must be at least 1")
        self.settings = settings
        self.mirror = mirror
        self.status = status
        self.log_format = log_format
        self.sidecar_version = sidecar_version
        self.cache_entries = cache_entries
        self.pids: dict[int, int] = {}
        """Worker slot -> process id, while it runs."""
        self.restarts = 0
        self._line = b""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener, identity = bind_unix_socket(self.settings)
        counters = SharedCounters.create(self.settings.workers)
        try:
            self._line = self._status_line()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._refresh_status)
                for slot in range(self.settings.workers):
                    await nursery.start(self._supervise, slot, listener, counters)
                log.info(
                    "serving the Redis protocol",
                    extra={"socket": str(self.settings.path), "workers": self.settings.workers},
                )
                task_status.started()
        finally:
            listener.close()
            remove_socket_file(self.settings.path, identity)
            counters.close()

    def _status_line(self) -> bytes:
        doc = self.status().to_json()
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"

    async def _refresh_status(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            self._line = self._status_line()

    def _spec(
        self, slot: int, listener: socket.socket, counters: SharedCounters, ready: int
    ) -> str:
        s = self.settings
        facts = ServerFacts(
            sidecar_version=self.sidecar_version,
            sidecar_pid=os.getpid(),
            started=time.time(),
            socket=str(s.path),
            socket_mode=s.mode,
            workers=s.workers,
            max_clients=s.max_clients,
            idle_timeout=s.idle_timeout,
            max_request_bytes=s.max_request_bytes,
            mirror=str(self.mirror),
        )
        doc = {
            "slot": slot,
            "workers": s.workers,
            "listen_fd": listener.fileno(),
            "counters_fd": counters.fd,
            "ready_fd": ready,
            "mirror": str(self.mirror),
            "max_clients": s.max_clients,
            "idle_timeout": s.idle_timeout,
            "max_request_bytes": s.max_request_bytes,
            "slice_us": s.slice_us,
            "view_max_age": s.view_max_age,
            "log_format": self.log_format,
            "cache_entries": self.cache_entries,
            "facts": {k: v for k, v in asdict(facts).items() if k != "pid"},
        }
        return json.dumps(doc)

    async def _start(
        self, slot: int, listener: socket.socket, counters: SharedCounters
    ) -> trio.Process:
        """A started worker that has opened the mirror; ReplicadError if it
        exits or stays silent instead."""
        ready_r, ready_w = os.pipe()
        try:
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "sidecar.resp_server",
                    self._spec(slot, listener, counters, ready_w),
                ],
                stdin=subprocess.PIPE,
                pass_fds=(listener.fileno(), counters.fd, ready_w),
            )
        finally:
            os.close(ready_w)
        stream = trio.lowlevel.FdStream(ready_r)
        try:
            with trio.move_on_after(WORKER_START_TIMEOUT):
                if await stream.receive_some(1) == b"R":
                    self.pids[slot] = proc.pid
                    return proc
            await _stop_process(proc)
            raise ReplicadError(
                f"socket worker {slot} did not start (exit status {proc.returncode}); "
                "its log says why"
            )
        finally:
            await stream.aclose()

    async def _supervise(
        self,
        slot: int,
        listener: socket.socket,
        counters: SharedCounters,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        proc = await self._start(slot, listener, counters)
        task_status.started()
        backoff = 0.1
        while True:
            try:
                began = time.monotonic()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._push_status, proc)
                    await proc.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await _stop_process(proc)
                self.pids.pop(slot, None)
                counters.set_running(slot, False)
            log.error(
                "socket worker exited; restarting it",
                extra={"worker": slot, "status": proc.returncode},
            )
            self.restarts += 1
            backoff = 0.1 if time.monotonic() - began > 10 else min(backoff * 2, 5.0)
            await trio.sleep(backoff)
            try:
                proc = await self._start(slot, listener, counters)
            except ReplicadError as exc:
                log.error("socket worker failed to start", extra={"error": str(exc)})

    async def _push_status(self, proc: trio.Process) -> None:
        assert proc.stdin is not None
        sent = b""
        last = 0.0
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                line = self._line
                if line != sent or time.monotonic() - last > 1.0:
                    await proc.stdin.send_all(line)
                    sent, last = line, time.monotonic()
                await trio.sleep(STATUS_INTERVAL)


async def _stop_process(proc: trio.Process) -> None:
    """SIGTERM, then SIGKILL after :data:`WORKER_STOP_TIMEOUT` seconds."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with trio.move_on_after(WORKER_STOP_TIMEOUT):
            await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.stdin is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await proc.stdin.aclose()


if __name__ == "__main__":
    sys.exit(worker_main())
