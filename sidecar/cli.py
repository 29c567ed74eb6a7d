"""The ``sidecar`` command line. ``main(argv)`` is callable from tests.

* ``sidecar run [--config FILE] [--origin URL] [--data DIR] [--datasets a,b]
  [--token-file F] [--health ADDR] [--poll-interval S] [--max-staleness S]
  [--log-format json|text] [--no-durable] [--socket PATH]`` -- run the agent
  (settings from the file, then ``SIDECAR_*`` variables, then flags).
* ``sidecar status [--health URL]`` -- what a running sidecar reports.
* ``sidecar get DATASET KEY [--data DIR]`` -- print one record of the mirror
  as JSON, read directly with :class:`sidecar.reader.Reader` (exit 1 when
  there is no such record or dataset). ``--data`` defaults to
  ``SIDECAR_DATA``, then ``./sidecar-data``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any

import httpx

from replicad.errors import ReplicadError


def _run(args: argparse.Namespace) -> int:
    from replicad.logs import setup_logging
    from sidecar import config as sidecar_config
    from sidecar.main import run

    overrides: dict[str, Any] = {
        "origin": args.origin,
        "data": args.data,
        "datasets": args.datasets,
        "json_views": args.json_views,
        "token_file": args.token_file,
        "health": args.health,
        "poll_interval": args.poll_interval,
        "max_staleness": args.max_staleness,
        "replica_id": args.replica_id,
        "log_format": args.log_format,
        "durable": False if args.no_durable else None,
        "hints": False if args.no_hints else None,
        "push": False if args.no_push else None,
        "serve_sync": args.serve_sync,
        "socket": args.socket,
    }
    cfg = sidecar_config.load(args.config, overrides)
    setup_logging(cfg.log_format, stream=sys.stdout)  # containers collect stdout
    run(cfg)
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        response = httpx.get(f"{args.health.rstrip('/')}/status", timeout=10)
    except httpx.TransportError as exc:
        raise ReplicadError(f"cannot reach the sidecar at {args.health}: {exc}") from exc
    doc = response.json()
    print(f"replica {doc['replica']}: {'ready' if doc['ready'] else 'NOT READY'}")
    print(f"{'dataset':<24} {'version':>10} {'lag':>6} {'records':>10} {'since sync':>11}  phase")
    for name, st in sorted(doc["datasets"].items()):
        since = st["seconds_since_sync"]
        print(
            f"{name:<24} {st['version'] if st['version'] is not None else '-':>10} "
            f"{st['lag'] if st['lag'] is not None else '-':>6} {st['records']:>10} "
            f"{'-' if since is None else f'{since:.1f}s':>11}  {st['phase']}"
            + (f"  last error: {st['last_error']}" if st["last_error"] else "")
        )
    return 0 if doc["ready"] else 1


def _get(args: argparse.Namespace) -> int:
    from sidecar.config import SidecarConfig
    from sidecar.json_render import to_json
    from sidecar.reader import Reader
    from sidecar.resp_commands import is_opaque

    data = args.data or os.environ.get("SIDECAR_DATA") or str(SidecarConfig().data)
    key = args.key.encode("utf-8", "surrogateescape")
    with Reader(data) as reader:
        if args.dataset not in reader.datasets():
            print(
                f"sidecar: error: the mirror at {data} has no dataset {args.dataset!r}",
                file=sys.stderr,
            )
            return 1
        record = reader.get(args.dataset, key)
        if record is None:
            print(f"sidecar: {args.dataset} has no record {args.key!r}", file=sys.stderr)
            return 1
        if is_opaque(record):
            value = record.value
            try:
                doc: Any = value.decode("utf-8")
            except UnicodeDecodeError:
                doc = {"base64": base64.b64encode(value).decode("ascii")}
        else:
            doc = json.loads(to_json(record.to_dict()))
    print(json.dumps(doc, ensure_ascii=False, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar", description="Edge replica sidecar.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("--config", help="TOML settings file")
    run.add_argument("--origin", help="origin URL, e.g. http://127.0.0.1:7070")
    run.add_argument("--data", help="mirror directory")
    run.add_argument("--datasets", help="comma-separated dataset names")
    run.add_argument("--token-file", help="file holding a read token")
    run.add_argument("--health", help="health port address, e.g. 127.0.0.1:7071")
    run.add_argument("--poll-interval", type=float, help="safety pull interval (s)")
    run.add_argument("--max-staleness", type=float, help="readiness bound (s)")
    run.add_argument("--replica-id", help="name reported to the origin (default: host name)")
    run.add_argument("--log-format", choices=["json", "text"])
    run.add_argument("--no-durable", action="store_true", help="no fsync (tests only)")
    run.add_argument("--no-hints", action="store_true", help="do not follow hints; poll only")
    run.add_argument(
        "--no-push", action="store_true", help="hints without their records: pull every version"
    )
    run.add_argument(
        "--serve-sync", help="relay mode: serve the sync API from the mirror at this address"
    )
    run.add_argument("--socket", help="serve the Redis protocol on this unix socket path")
    run.add_argument(
        "--json-views", help="comma-separated datasets whose records' JSON the mirror stores too"
    )
    status = sub.add_parser("status", help="ask a running sidecar how it is doing")
    status.add_argument("--health", default="http://127.0.0.1:7071", help="its health URL")
    get = sub.add_parser("get", help="print one record of the mirror as JSON")
    get.add_argument("dataset")
    get.add_argument("key")
    get.add_argument("--data", help="mirror directory (default: SIDECAR_DATA, ./sidecar-data)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "get":
            return _get(args)
        return _status(args)
    except ReplicadError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the health port is in use
        detail = exc.strerror or str(exc)
        print(
            f"sidecar: error: {detail}" + (f": {exc.filename}" if exc.filename else ""),
            file=sys.stderr,
        )
        return 1
    except (ValueError, KeyError) as exc:
        print(f"sidecar: error: unexpected answer: {json.dumps(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
