"""The sidecar's settings: defaults, a TOML file, the environment, then flags.

Example ``sidecar.toml``::

    origin = "http://origin.internal:7070"
    data = "/var/lib/sidecar"                 # the mirror (and its lock file)
    datasets = ["user_profile", "item_stats"]
    token_file = "/etc/sidecar/read-token"    # or SIDECAR_TOKEN
    replica_id = "host-a"                     # default: the host name
    health = "127.0.0.1:7071"                 # /healthz /readyz /metrics /status
    poll_interval = 5.0                        # safety pull without hints (s)
    max_staleness = 30.0                       # readiness bound (s)
    ack_interval = 10.0
    map_size_mb = 64                           # grows on demand (doubling)
    max_readers = 1024
    log_format = "json"
    hints = true                               # false: rely on the safety poll
    push = true                                # small versions arrive with their records
    apply_nice = 10                            # large applies run this much nicer (0: off)
    serve_sync = "0.0.0.0:7070"                # relay: serve the sync API below
    relay_read_tokens = ["..."]                # tokens sidecars below must send
    relay_tls_cert = "/etc/sidecar/cert.pem"   # relay: serve the sync API over TLS
    relay_tls_key = "/etc/sidecar/key.pem"     # (both or neither)
    socket = "/run/sidecar/redis.sock"         # Redis protocol reads (docs/reads.md)
    socket_mode = "0o660"                      # the socket file's mode
    socket_group = "app"                       # and group (name or number)
    socket_workers = 2                         # reader processes serving it
    socket_slice_us = 100                      # scheduler time slice they ask for (0: default)
    socket_max_clients = 10000
    socket_idle_timeout = 0                    # seconds; 0 = never close idle clients
    socket_view_max_age = 0.05                 # seconds a worker keeps a read snapshot
    socket_max_request_bytes = 4194304
    json_views = ["user_profile"]              # store typed records' JSON too (docs/reads.md)

Every setting can also come from the environment as ``SIDECAR_<NAME>``
(``SIDECAR_TOKEN`` wins over ``SIDECAR_TOKEN_FILE`` when both are set)
(``SIDECAR_ORIGIN``, ``SIDECAR_DATASETS=a,b``, ``SIDECAR_TOKEN``, ...), which is
how a container is usually configured. Precedence: flags, environment, file,
defaults.
"""

from __future__ import annotations

import math
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import httpx

from replicad.config import Listen
from replicad.errors import ConfigError


@dataclass(frozen=True)
class SidecarConfig:
    origin: str = "http://127.0.0.1:7070"
    data: Path = Path("./sidecar-data")
    datasets: tuple[str, ...] = ()
    token: str | None = None
    replica_id: str = ""
    health: Listen | None = None
    poll_interval: float = 5.0
    max_staleness: float = 30.0
    ack_interval: float = 10.0
    request_timeout: float = 60.0
    map_size_mb: int = 64
    max_map_size_mb: int = 1 << 20
    max_readers: int = 1024
    file_mode: int = 0o660
    """Mode of the mirror's files: readers in the group must be able to write
    ``lock.mdb`` (LMDB's reader table), so group read-write."""
    log_format: str = "json"
    durable: bool = True
    hints: bool = True
    push: bool = True
    """Ask the hint stream for pushed diffs (DiffPush): a small version is
    applied with no request (docs/protocol.md)."""
    apply_nice: int = 10
    """The thread applying large batches runs at this much higher a nice
    value, so the socket's worker processes get a core first
    (sidecar/apply_thread.py)."""
    ca_file: Path | None = None
    serve_sync: Listen | None = None
    relay_read_tokens: frozenset[str] = frozenset()
    relay_tls_cert: Path | None = None
    relay_tls_key: Path | None = None
    socket: Path | None = None
    """Serve the Redis protocol on this unix socket (docs/reads.md)."""
    socket_mode: int = 0o660
    socket_group: str | None = None
    socket_workers: int = 2
    socket_slice_us: int = 100
    """The time slice (microseconds) the socket workers ask Linux's
    scheduler for: short, so a waking reader preempts long-running work
    (sidecar/sched.py); 0 leaves the kernel's default."""
    socket_max_clients: int = 10_000
    socket_idle_timeout: float = 0.0
    socket_max_request_bytes: int = 4 << 20
    socket_view_max_age: float = 0.05
    """Seconds a socket worker keeps one read snapshot across requests while
    the mirror commits nothing (it bounds how long an idle worker holds a
    snapshot a later commit made old); 0: a new snapshot every turn."""
    json_views: tuple[str, ...] = ()
    """Datasets whose records the mirror also keeps as rendered JSON (the
    socket's HGET replies, stored: served without decoding; about four times
    the space of typed records, and a render per record written)."""

    def validate(self) -> SidecarConfig:
        if not self.datasets:
            raise ConfigError("no datasets configured (datasets = [...] or --datasets a,b)")
        if (self.relay_tls_cert is None) != (self.relay_tls_key is None):
            raise ConfigError("relay_tls_cert and relay_tls_key must be set together")
        if self.relay_tls_cert is not None and self.serve_sync is None:
            raise ConfigError("relay_tls_cert is set but serve_sync is not (no relay port)")
        try:
            url = httpx.URL(self.origin)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigError(f"invalid origin URL {self.origin!r}: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"origin must be an http(s) URL, got {self.origin!r}")
        for name in ("poll_interval", "max_staleness", "ack_interval", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.map_size_mb < 1 or self.max_map_size_mb < self.map_size_mb:
            raise ConfigError("need 1 <= map_size_mb <= max_map_size_mb")
        if self.log_format not in ("json", "text"):
            raise ConfigError("log_format must be 'json' or 'text'")
        if not 0 <= self.apply_nice <= 19:
            raise ConfigError("apply_nice must be between 0 and 19")
        if not 1 <= self.socket_workers <= 256:
            raise ConfigError("socket_workers must be between 1 and 256")
        if self.socket_slice_us != 0 and not 100 <= self.socket_slice_us <= 100_000:
            raise ConfigError("socket_slice_us must be 0 (the default slice) or 100 to 100000")
        if self.socket_max_clients < 1:
            raise ConfigError("socket_max_clients must be at least 1")
        if self.socket_idle_timeout < 0:
            raise ConfigError("socket_idle_timeout must be 0 (never) or positive")
        if not 0 <= self.socket_view_max_age <= 10:
            raise ConfigError("socket_view_max_age must be between 0 and 10 seconds")
        unknown = sorted(set(self.json_views) - set(self.datasets))
        if unknown:
            raise ConfigError(f"json_views names datasets not in datasets: {', '.join(unknown)}")
        if self.socket_max_request_bytes < 1024:
            raise ConfigError("socket_max_request_bytes must be at least 1024")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError("socket_mode must be a file mode such as 0o660")
        if not self.replica_id:
            return replace(self, replica_id=socket.gethostname())
        return self


_FIELDS = {f.name for f in fields(SidecarConfig)} | {"token_file"}


def _float(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def _int(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer")
    try:
        return int(str(value), 0) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None


def _mode(key: str, value: object) -> int:
    """A file mode: an int (TOML ``0o660``) or octal text (``660``, ``0660``, ``0o660``)."""
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        try:
            return int(text, 8)
        except ValueError:
            raise ConfigError(f"{key} must be an octal file mode, got {value!r}") from None
    return _int(key, value)


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _items(key: str, value: object) -> list[object]:
    """A list setting: a list, or comma-separated text."""
    if isinstance(value, str):
        return list(value.split(","))
    if isinstance(value, list | tuple):
        return list(value)
    raise ConfigError(f"{key} must be a list or comma-separated text, got {value!r}")


def from_mapping(values: Mapping[str, Any], base: SidecarConfig | None = None) -> SidecarConfig:
    """Apply ``values`` (None values ignored). ConfigError for unknown keys
    or values of the wrong type."""
    cfg = base or SidecarConfig()
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        match key:
            case "origin" | "replica_id" | "log_format":
                changes[key] = str(value).rstrip("/") if key == "origin" else str(value)
            case "data" | "ca_file":
                changes[key] = Path(str(value))
            case "relay_tls_cert" | "relay_tls_key":
                changes[key] = Path(str(value)) if str(value) else None
            case "socket":
                changes[key] = Path(str(value)) if str(value) else None
            case "socket_group":
                changes[key] = str(value) or None
            case "socket_mode":
                changes[key] = _mode(key, value)
            case "datasets" | "json_views":
                items = _items(key, value)
                changes[key] = tuple(str(v).strip() for v in items if str(v).strip())
            case "token":
                changes[key] = str(value).strip() or None
            case "token_file":
                try:
                    changes["token"] = Path(str(value)).read_text(encoding="utf-8").strip() or None
                except OSError as exc:
                    raise ConfigError(f"cannot read token file {value}: {exc.strerror}") from exc
            case "health" | "serve_sync":
                changes[key] = Listen.parse(str(value)) if str(value) else None
            case "relay_read_tokens":
                items = _items(key, value)
                changes[key] = frozenset(str(v).strip() for v in items if str(v).strip())
            case (
                "poll_interval"
                | "max_staleness"
                | "ack_interval"
                | "request_timeout"
                | "socket_idle_timeout"
                | "socket_view_max_age"
            ):
                changes[key] = _float(key, value)
            case (
                "map_size_mb"
                | "max_map_size_mb"
                | "max_readers"
                | "apply_nice"
                | "file_mode"
                | "socket_workers"
                | "socket_slice_us"
                | "socket_max_clients"
                | "socket_max_request_bytes"
            ):
                changes[key] = _int(key, value)
            case "durable" | "hints" | "push":
                changes[key] = _bool(key, value)
    return replace(cfg, **changes)


def load(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> SidecarConfig:
    """Defaults, then the TOML file, then ``SIDECAR_*`` variables, then
    ``overrides`` (flags); validated. ConfigError says what is wrong."""
    cfg = SidecarConfig()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                cfg = from_mapping(tomllib.load(fh), cfg)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {path}: {exc}") from exc
    env = os.environ if environ is None else environ
    # a fixed order (not the set's): SIDECAR_TOKEN_FILE first, so that
    # SIDECAR_TOKEN, when both are set, is the one that counts
    names = sorted(_FIELDS, key=lambda n: (n != "token_file", n))
    for name in names:
        value = env.get(f"SIDECAR_{name.upper()}")
        if value is not None:
            cfg = from_mapping({name: value}, cfg)
    if overrides:
        cfg = from_mapping(overrides, cfg)
    return cfg.validate()
