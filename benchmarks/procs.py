"""Child processes for the benchmarks that run real servers: a free port, a
clean environment, a process with its log, and a bounded wait for it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    """This environment with the project importable and no ``REPLICAD_*`` or
    ``SIDECAR_*`` settings or tokens from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLICAD_", "SIDECAR_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Proc:
    """A child process with its output in a log file; ``stop`` sends SIGTERM,
    then SIGKILL after a timeout."""

    def __init__(self, cmd: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as fh:
            self.popen = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=fh,
                cwd=str(ROOT),
                env=env or child_env(),
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def wait(
    what: str, proc: Proc, ready: Callable[[], bool], timeout: float, poll: float = 0.02
) -> None:
    """Poll ``ready`` (connection errors count as not yet) until it holds;
    RuntimeError with the log's tail if the process exits or ``timeout``
    passes."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(httpx.TransportError, OSError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{proc.tail()}")
        time.sleep(poll)
