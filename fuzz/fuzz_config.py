"""Fuzz harness: config files (``replicad/config.py``, ``sidecar/config.py``).

The first input byte picks the target and the source: the origin's TOML
file, the sidecar's TOML file, or the sidecar's ``SIDECAR_*`` environment
(the rest of the input as ``NAME=value`` lines). Each goes through the real
``load`` (the file written to a temporary directory). Checks: ``load``
returns a validated config or raises :class:`~replicad.errors.ConfigError`,
nothing else -- not a TypeError from a value of the wrong TOML type, not an
OverflowError, not tomllib's own error.

Settings that name files (token files) are followed as given: a config file
is written by the operator, so inputs naming paths under ``/dev``, ``/proc``
or ``/sys`` are skipped (reading ``/dev/zero`` never ends, by design).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fuzz import driver

with driver.instrumented(__name__ == "__main__" and driver.atheris_wanted()):
    from replicad import config as origin_config
    from replicad.errors import ConfigError
    from sidecar import config as sidecar_config

# memory-backed where there is one: a million small files on a busy disk is slow
_DIR = Path(
    tempfile.mkdtemp(prefix="fuzz-config-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
)
_FILE = _DIR / "config.toml"
atexit.register(shutil.rmtree, _DIR, True)


def _check_origin(cfg: origin_config.OriginConfig) -> None:
    """What the server relies on, once a config is accepted."""
    ok = (
        isinstance(cfg.data, Path)
        and all(isinstance(t, str) and t for t in cfg.write_tokens | cfg.read_tokens)
        and isinstance(cfg.listen, origin_config.Listen)
        and 1 <= cfg.map_size_mb <= cfg.max_map_size_mb <= origin_config.MAX_MAP_SIZE_MB
        and cfg.log_format in ("json", "text")
    )
    if not ok:
        raise driver.FuzzFindingError(f"accepted a config the server cannot use: {cfg}")


def _check_sidecar(cfg: sidecar_config.SidecarConfig) -> None:
    ok = (
        all(isinstance(d, str) and d for d in cfg.datasets)
        and (cfg.token is None or isinstance(cfg.token, str))
        and all(isinstance(t, str) for t in cfg.relay_read_tokens)
        and isinstance(cfg.data, Path)
        and all(isinstance(getattr(cfg, n), int) for n in ("map_size_mb", "max_readers"))
    )
    if not ok:
        raise driver.FuzzFindingError(f"accepted a sidecar config it cannot use: {cfg}")


def one_input(data: bytes) -> None:
    if not data:
        return
    text = data[1:].decode("utf-8", "replace")
    if any(p in text for p in ("/dev", "/proc", "/sys")):
        return
    target = data[0] % 3
    try:
        if target == 2:
            environ = {}
            for line in text.splitlines():
                name, sep, value = line.partition("=")
                if sep and "\x00" not in name + value:
                    environ["SIDECAR_" + name.strip().upper()] = value
            environ.setdefault("SIDECAR_DATASETS", "a")
            _check_sidecar(sidecar_config.load(None, environ=environ))
            return
        # the sidecar's target gets valid UTF-8 (its known, reported UTF-8
        # bug would otherwise stop most inputs before they are parsed)
        _FILE.write_bytes(data[1:] if target == 0 else text.encode())
        if target == 0:
            _check_origin(origin_config.load(_FILE, environ={}))
        else:
            _check_sidecar(sidecar_config.load(_FILE, environ={"SIDECAR_DATASETS": "a"}))
    except ConfigError:
        return


def seeds() -> list[bytes]:
    origin = (
        'data = "/var/lib/replicad"\nlisten = "127.0.0.1:7070"\nmap_size_mb = 1024\n'
        "max_map_size_mb = 65536\nmax_body_mb = 256\ngroup_commit_max = 256\n"
        'push_max_kb = 256\nlog_format = "json"\ndurable = true\n'
        'write_tokens = ["a", "b"]\nread_tokens = "c,d"\n'
    )
    sidecar = (
        'origin = "http://origin.internal:7070"\ndata = "/var/lib/sidecar"\n'
        'datasets = ["user_profile", "item_stats"]\nreplica_id = "host-a"\n'
        'health = "127.0.0.1:7071"\npoll_interval = 5.0\nmax_staleness = 30.0\n'
        "map_size_mb = 1024\nmax_readers = 1024\nfile_mode = 0o660\nhints = true\n"
        'serve_sync = "0.0.0.0:7070"\nrelay_read_tokens = ["x"]\nsocket = "/run/s.sock"\n'
        'socket_mode = "0o660"\nsocket_workers = 2\nsocket_idle_timeout = 0\n'
    )
    env = "ORIGIN=https://o:1\nPOLL_INTERVAL=0.5\nHINTS=off\nMAP_SIZE_MB=0x10\nFILE_MODE=0o600\n"
    return [b"\x00" + origin.encode(), b"\x01" + sidecar.encode(), b"\x02" + env.encode()]


SEEDS = seeds()

if __name__ == "__main__":
    os.chdir(_DIR)  # relative paths in a fuzzed config land here
    sys.exit(driver.main("fuzz_config", one_input, SEEDS))
