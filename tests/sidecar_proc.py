"""Start a real sidecar process for tests (``python -m sidecar run``).

Usage::

    with SidecarProcess(tmp_path / "s1", origin_url, ["up"]) as sidecar:
        sidecar.wait_ready()
        sidecar.kill9(); sidecar.start()   # same mirror directory

The process gets its settings from flags and ``SIDECAR_*`` variables, its
health port on a free 127.0.0.1 port, and keeps its mirror and log in the
given directory; leaving the ``with`` block stops it and removes the files.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.origin_proc import free_port
from tests.procs import ROOT, ManagedProcess


class SidecarProcess(ManagedProcess):
    what = "sidecar"

    def __init__(
        self,
        workdir: Path,
        origin: str,
        datasets: Sequence[str],
        *,
        token: str | None = None,
        poll_interval: float = 5.0,
        hints: bool = True,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        super().__init__(self.workdir / "sidecar.log")
        self.data = self.workdir / "mirror"
        self.origin = origin
        self.datasets = list(datasets)
        self.token = token
        self.poll_interval = poll_interval
        self.hints = hints
        self.extra_env = extra_env or {}
        self.port = 0

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SidecarProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self, timeout: float = 15.0) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["SIDECAR_ORIGIN"] = self.origin
        env["SIDECAR_DATASETS"] = ",".join(self.datasets)
        if self.token:
            env["SIDECAR_TOKEN"] = self.token
        env.update(self.extra_env)
        cmd = [
            sys.executable, "-m", "sidecar", "run",
            "--data", str(self.data),
            "--health", f"127.0.0.1:{self.port}",
            "--poll-interval", str(self.poll_interval),
            "--replica-id", self.workdir.name,
            "--log-format", "json",
        ]  # fmt: skip
        if not self.hints:
            cmd.append("--no-hints")
        self.spawn(cmd, env=env, health_url=self.health_url + "/healthz", timeout=timeout)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(self.health_url + "/status", timeout=5).json()
        return doc

    def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if predicate(last):
                    return last
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise AssertionError(
            f"sidecar condition not reached; last status {last}\n{self.log_tail()}"
        )

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_until(lambda st: bool(st.get("ready")), timeout)

    def wait_version(self, dataset: str, version: int, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_until(
            lambda st: (st["datasets"][dataset]["version"] or -1) >= version, timeout
        )
