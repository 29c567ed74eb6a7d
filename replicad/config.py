"""The origin's settings: defaults, a TOML file, then command-line flags.

Example ``replicad.toml``::

    data = "/var/lib/replicad"
    listen = "127.0.0.1:7070"        # or "unix:/run/replicad.sock"
    write_tokens_file = "/etc/replicad/write-tokens"   # one token per line
    read_tokens_file = "/etc/replicad/read-tokens"
    tls_cert = "/etc/replicad/cert.pem"                 # TLS when both are set
    tls_key = "/etc/replicad/key.pem"
    map_size_mb = 1024               # initial LMDB map; grows on demand
    max_map_size_mb = 65536
    max_body_mb = 256
    group_commit_max = 256           # write batches per LMDB transaction
    push_max_kb = 256                # versions up to this size are pushed with their hint
    ingest_workers = 2               # processes that decode and encode large write bodies
    ingest_offload_kb = 256          # bodies from this size go to them (0 workers: none do)
    log_format = "json"              # or "text"

Tokens may also come from the environment: ``REPLICAD_WRITE_TOKENS`` and
``REPLICAD_READ_TOKENS`` (comma-separated). Precedence: flags over the
environment over the file over defaults.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from replicad.errors import ConfigError


def default_ingest_workers() -> int:
    """One ingest worker per core beyond the origin's own, at least two (so
    that one body's decoding overlaps another's commit even on two cores:
    about 110,000 records/s against 97,000 with one worker, measured) and at
    most four."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 2
    return max(2, min(4, cores - 1))


def check_tls_files(cert: Path, key: Path, what: str) -> None:
    """ConfigError, naming ``what``, unless ``cert`` and ``key`` load as a
    server certificate chain and its private key (checked before a port is
    bound, so a wrong path is not reported as a listening failure)."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # an OSError too: caught first
        raise ConfigError(
            f"{what}: {cert} and {key} are not a certificate and its key: {exc}"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {exc.filename or cert}: {exc.strerror}") from exc


@dataclass(frozen=True)
class Listen:
    """Where to listen: TCP ``host:port`` or ``unix:PATH``."""

    host: str = "127.0.0.1"
    port: int = 7070
    unix_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Listen:
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise ConfigError("listen: unix: needs a path")
            return cls(unix_path=path)
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"listen: expected HOST:PORT or unix:PATH, got {text!r}")
        host = host.strip("[]")
        try:
            port_n = int(port)
        except ValueError:
            raise ConfigError(f"listen: bad port in {text!r}") from None
        if not 0 <= port_n <= 65535:
            raise ConfigError(f"listen: port {port_n} out of range")
        return cls(host=host, port=port_n)

    def bind(self) -> str:
        """The address in hypercorn's ``bind`` syntax."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.bind()


MAX_MAP_SIZE_MB = 1 << 40
"""The largest map LMDB can be asked for here (2**60 bytes); a larger one
would overflow its C types."""


@dataclass(frozen=True)
class OriginConfig:
    data: Path = Path("./replicad-data")
    listen: Listen = field(default_factory=Listen)
    write_tokens: frozenset[str] = frozenset()
    read_tokens: frozenset[str] = frozenset()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    map_size_mb: int = 1024
    max_map_size_mb: int = 65536
    max_body_mb: int = 256
    group_commit_max: int = 256
    push_max_kb: int = 256
    """Versions whose changes total at most this many KiB are pushed to
    subscribers that ask for diffs (0: hints only)."""
    ingest_workers: int = field(default_factory=default_ingest_workers)
    """Worker processes that decode and encode large write bodies
    (:mod:`replicad.ingest`); 0 does that work in the origin process."""
    ingest_offload_kb: int = 256
    """Write bodies of at least this many KiB go to an ingest worker."""
    log_format: str = "json"
    durable: bool = True
    """fsync each commit (never turn off in production; tests may)."""

    @property
    def auth_enabled(self) -> bool:
        return bool(self.write_tokens or self.read_tokens)

    def validate(self) -> OriginConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be set together")
        if self.map_size_mb < 1 or self.max_map_size_mb < self.map_size_mb:
            raise ConfigError("need 1 <= map_size_mb <= max_map_size_mb")
        if self.max_map_size_mb > MAX_MAP_SIZE_MB:
            raise ConfigError(f"max_map_size_mb must be at most {MAX_MAP_SIZE_MB} (2**40)")
        if self.max_body_mb < 1:
            raise ConfigError("max_body_mb must be >= 1")
        if self.group_commit_max < 1:
            raise ConfigError("group_commit_max must be >= 1")
        if not 0 <= self.push_max_kb <= 512:
            raise ConfigError("push_max_kb must be between 0 and 512")
        if not 0 <= self.ingest_workers <= 64:
            raise ConfigError("ingest_workers must be between 0 and 64")
        if self.ingest_offload_kb < 0:
            raise ConfigError("ingest_offload_kb must be >= 0")
        if self.log_format not in ("json", "text"):
            raise ConfigError("log_format must be 'json' or 'text'")
        if self.write_tokens & self.read_tokens:
            raise ConfigError("a token cannot be both a write and a read token")
        return self


def _read_tokens(path: str | Path) -> frozenset[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
    return frozenset(t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#"))


def _split_tokens(text: str) -> frozenset[str]:
    return frozenset(t.strip() for t in text.split(",") if t.strip())


def _token_list(key: str, value: Any) -> frozenset[str]:
    """Tokens from a TOML array (or comma-separated text): strings only."""
    if isinstance(value, str):
        return _split_tokens(value)
    if not isinstance(value, list | tuple | set | frozenset) or not all(
        isinstance(t, str) for t in value
    ):
        raise ConfigError(f"{key} must be a list of strings")
    return frozenset(t.strip() for t in value if t.strip())


_TEXT_KEYS = frozenset(
    {"data", "listen", "tls_cert", "tls_key", "log_format", "write_tokens_file", "read_tokens_file"}
)


_KEYS = {f.name for f in fields(OriginConfig)} | {"write_tokens_file", "read_tokens_file"}


def from_mapping(values: Mapping[str, Any], base: OriginConfig | None = None) -> OriginConfig:
    """Apply ``values`` (from TOML or flags; None values are ignored) to
    ``base``. Raises ConfigError for unknown keys or values of the wrong type."""
    cfg = base or OriginConfig()
    unknown = sorted(set(values) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in _TEXT_KEYS and not isinstance(value, str | Path):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
        try:
            match key:
                case "data":
                    changes["data"] = Path(str(value))
                case "listen":
                    changes["listen"] = Listen.parse(str(value))
                case "write_tokens" | "read_tokens":
                    changes[key] = _token_list(key, value)
                case "write_tokens_file" | "read_tokens_file":
                    changes[key.removesuffix("_file")] = _read_tokens(str(value))
                case "tls_cert" | "tls_key":
                    changes[key] = Path(str(value))
                case (
                    "map_size_mb"
                    | "max_map_size_mb"
                    | "max_body_mb"
                    | "group_commit_max"
                    | "push_max_kb"
                    | "ingest_workers"
                    | "ingest_offload_kb"
                ):
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise ConfigError(f"{key} must be an integer")
                    changes[key] = value
                case "durable":
                    if not isinstance(value, bool):
                        raise ConfigError("durable must be true or false")
                    changes[key] = value
                case "log_format":
                    changes[key] = str(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: {exc}") from exc
    return replace(cfg, **changes)


def load(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> OriginConfig:
    """Defaults, then the TOML file (if any), then the environment, then
    ``overrides`` (flags). Raises ConfigError with the file and reason."""
    cfg = OriginConfig()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: {exc}") from exc
        except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib does not translate this
            raise ConfigError(f"config {path}: not UTF-8 text ({exc.reason})") from exc
        cfg = from_mapping(doc, cfg)
    env = os.environ if environ is None else environ
    env_values = {
        "write_tokens": env.get("REPLICAD_WRITE_TOKENS"),
        "read_tokens": env.get("REPLICAD_READ_TOKENS"),
    }
    cfg = from_mapping(env_values, cfg)
    if overrides:
        cfg = from_mapping(overrides, cfg)
    return cfg.validate()
