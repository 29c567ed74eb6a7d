"""Start a real origin server process for tests (``python -m replicad.server``).

Usage::

    with OriginProcess(tmp_path, write_tokens=["w"], read_tokens=["r"]) as origin:
        httpx.get(origin.base_url + "/healthz")
        origin.kill9()      # SIGKILL, no clean shutdown
        origin.restart()    # same data directory, a new port

The process listens on 127.0.0.1 on a free port (picked by binding a socket to
port 0), keeps its data, config and log under the given directory, and gets
its tokens through the environment (never on the command line). ``start``
waits until ``/healthz`` answers; ``stop`` sends SIGTERM and, after a timeout,
SIGKILL. Leaving the ``with`` block stops the process and removes its files.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from tests.procs import ROOT, ManagedProcess


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel numbers outgoing connections from."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the
    kernel's ephemeral range: a process restarted on the same port (the
    chaos origin and relay) must not find it taken meanwhile by some
    client's outgoing connection, which the kernel numbers from that range
    (a chaos relay once failed to come back with "Address already in use")."""
    low, high = _ephemeral_ports()
    spans = [(r0, r1) for r0, r1 in ((20_000, low - 1), (high + 1, 65_535)) if r1 - r0 > 1000]
    rng = random.Random()
    for _ in range(200 if spans else 0):
        r0, r1 = rng.choice(spans)
        port = rng.randint(r0, r1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


class OriginProcess(ManagedProcess):
    """One origin server process; see the module docstring."""

    what = "origin"

    def __init__(
        self,
        workdir: Path,
        *,
        write_tokens: Iterable[str] = (),
        read_tokens: Iterable[str] = (),
        max_body_mb: int = 1,
        durable: bool = True,
        ping_interval: float | None = None,
        start_timeout: float = 15.0,
        extra_config: str = "",
    ) -> None:
        """``extra_config``: more lines of the TOML file (map sizes, say)."""
        self.workdir = Path(workdir)
        super().__init__(self.workdir / "origin.log")
        self.data = self.workdir / "data"
        self.config_path = self.workdir / "replicad.toml"
        self.write_tokens = list(write_tokens)
        self.read_tokens = list(read_tokens)
        self.max_body_mb = max_body_mb
        self.durable = durable
        self.ping_interval = ping_interval
        self.start_timeout = start_timeout
        self.extra_config = extra_config
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OriginProcess:
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
        """Stop the process (if running) and remove the working directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------ lifecycle

    def start(self, *, same_port: bool = False) -> None:
        """Start the server on a new free port (or, with ``same_port``, the
        one it had, so clients keep their URL) and wait until /healthz
        answers. Raises RuntimeError (with the log's tail) if it exits or
        times out."""
        # the config file is written at every start, so that a restart can
        # change ``extra_config``
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"max_body_mb = {self.max_body_mb}\nlog_format = 'json'\n{self.extra_config}\n"
        )
        if not (same_port and self.port):
            self.port = free_port()
        env = dict(os.environ)
        env["REPLICAD_WRITE_TOKENS"] = ",".join(self.write_tokens)
        env["REPLICAD_READ_TOKENS"] = ",".join(self.read_tokens)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [
            sys.executable,
            "-m",
            "replicad.server",
            "--config",
            str(self.config_path),
            "--data",
            str(self.data),
            "--listen",
            f"127.0.0.1:{self.port}",
        ]
        if not self.durable:
            cmd.append("--no-durable")
        if self.ping_interval is not None:
            cmd += ["--ping-interval", str(self.ping_interval)]
        self.spawn(
            cmd,
            env=env,
            cwd=self.workdir,
            health_url=self.base_url + "/healthz",
            timeout=self.start_timeout,
        )

    def restart(self) -> None:
        """Stop (gracefully, if still running) and start again on the same data."""
        self.stop()
        self.start()
