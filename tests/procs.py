"""A child process under test: spawned with its output in a log file, waited
for until an HTTP health URL answers, stopped with SIGTERM (SIGKILL after a
timeout) or killed outright. Shared by the origin and sidecar fixtures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
"""The checkout: child processes find the project's packages here."""


class ManagedProcess:
    """Subclasses build the command and call :meth:`spawn`."""

    what = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def proc_pid(self) -> int:
        """The running process's pid; RuntimeError if it is not running."""
        if self.proc is None:
            raise RuntimeError(f"{self.what} is not running")
        return self.proc.pid

    def spawn(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        health_url: str,
        timeout: float,
    ) -> None:
        """Start ``cmd`` and wait until ``health_url`` answers 200. Raises
        RuntimeError (with the log's tail) if it exits or times out."""
        if self.proc is not None:
            raise RuntimeError("already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=None if env is None else dict(env),
                cwd=None if cwd is None else str(cwd),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"{self.what} exited with {code} at start:\n{self.log_tail()}")
            try:
                if httpx.get(health_url, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.what} did not answer in time:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Returns the exit
        code (None if it was not running)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill9(self) -> None:
        """SIGKILL: the process dies without any shutdown work."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def run_python(script: str, *args: str, timeout: float = 60.0) -> None:
    """Run ``script`` in a new Python process with this checkout on its
    path (another process: LMDB opens an environment once per process)."""
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    subprocess.run(
        [sys.executable, "-c", script, *args],
        check=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path},
    )
