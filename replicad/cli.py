"""The ``replicad`` command line.

``main(argv)`` is callable from tests and returns the exit status: 0 on
success, 1 when the work failed (an error from the origin, a bad file, a
missing record), 2 for a usage error (argparse's own exit), 130 when
interrupted. Expected errors (every :class:`~replicad.errors.ReplicadError`)
print ``replicad: error: <message>`` on stderr, never a traceback.

Subcommands:

* ``serve`` -- run the origin (config from ``--config FILE``, flags override).
* ``create-dataset NAME (--schema FILE.json | --opaque)`` -- a new dataset.
* ``evolve-schema NAME --schema FILE.json`` -- append fields to a schema.
* ``load NAME FILE`` -- write a CSV or JSON-lines file (``.gz`` too) in
  batches of upserts, or with ``--replace`` as one bulk replace that publishes
  only what changed; a progress bar on stderr.
* ``get NAME KEY`` -- print one record as JSON (exit 1 if there is none).
* ``status`` -- the datasets; ``fleet`` -- the replicas that reported in.
* ``reset-history NAME`` -- start a new epoch (replicas repair with Merkle).
* ``demo`` -- the sync core walk-through (:mod:`replicad.demo`), no origin.

The client commands find the origin with ``--origin URL`` (else
``$REPLICAD_URL``, else ``http://127.0.0.1:7070``) and authenticate with
``--token`` or ``--token-file`` (else ``$REPLICAD_TOKEN``). These options may be
given before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from replicad import __version__
from replicad.client import DEFAULT_URL, OriginClient
from replicad.errors import BadRequestError, ConfigError, ReplicadError, SchemaError
from replicad.loader import FORMATS, batches, open_records
from replicad.progress import Progress, format_count
from replicad.schema import Schema

_PROG = "replicad"


# --- helpers -----------------------------------------------------------------


def _read_token_file(path: str) -> str:
    """The first non-empty, non-comment line of ``path``; ConfigError if none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    for line in text.splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            return token
    raise ConfigError(f"token file {path} holds no token")


def _read_schema_file(path: str) -> dict[str, Any]:
    """The JSON schema document in ``path``, checked locally (with ``version``
    1 assumed when absent) so that mistakes name the file. ConfigError if the
    file cannot be read or parsed, SchemaError if the schema is invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read schema file {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"schema file {path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SchemaError(f"{path}: a schema is a JSON object with 'fields'")
    try:
        Schema.from_json({"version": 1, **doc})
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}") from exc
    return doc


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    """Print an aligned text table (numbers right-aligned)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(parts).rstrip(), file=out)


def _ago(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def _dump(doc: object, out: TextIO) -> None:
    print(json.dumps(doc, ensure_ascii=False, indent=2), file=out)


# --- commands ----------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from replicad import config

    overrides: dict[str, Any] = {
        "data": args.data,
        "listen": args.listen,
        "write_tokens_file": args.write_token_file,
        "read_tokens_file": args.read_token_file,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "map_size_mb": args.map_size_mb,
        "max_body_mb": args.max_body_mb,
        "log_format": args.log_format,
        "durable": False if args.no_durable else None,
    }
    cfg = config.load(args.config, overrides)
    # Imported only when serving: the client commands need none of
    # trio/hypercorn/lmdb loaded.
    from replicad.server import run_server

    run_server(cfg)
    return 0


def _cmd_create(args: argparse.Namespace, client: OriginClient, out: TextIO) -> int:
    schema = _read_schema_file(args.schema) if args.schema else None
    merkle = None
    if args.fanout is not None or args.depth is not None:
        merkle = {"fanout": args.fanout or 16, "depth": args.depth or 4}
    queue: dict[str, Any] | None = None
    if args.queue_max is not None or args.policy is not None:
        queue = {}
        if args.queue_max is not None:
            queue["max_entries"] = args.queue_max
        if args.policy is not None:
            queue["policy"] = args.policy
    info = client.create_dataset(
        args.name,
        schema,
        opaque=args.opaque,
        merkle=merkle,
        queue=queue,
        max_value_bytes=args.max_value_bytes,
    )
    if args.json:
        _dump(info, out)
        return 0
    kind = info.get("kind", "?")
    detail = ""
    sch = info.get("schema")
    if isinstance(sch, dict):
        detail = f", schema v{sch.get('version')} with {len(sch.get('fields', []))} fields"
    print(
        f"created dataset {info.get('name')} ({kind}{detail}); "
        f"epoch {str(info.get('epoch', ''))[:8]}, version {info.get('version')}",
        file=out,
    )
    return 0


def _cmd_evolve(args: argparse.Namespace, client: OriginClient, out: TextIO) -> int:
    info = client.evolve_schema(args.name, _read_schema_file(args.schema))
    if args.json:
        _dump(info, out)
        return 0
    sch = info.get("schema") or {}
    print(
        f"schema of {args.name} is now version {sch.get('version')} "
        f"({len(sch.get('fields', []))} fields)",
        file=out,
    )
    return 0


def _cmd_load(
    args: argparse.Namespace,
    client: OriginClient,
    out: TextIO,
    err: TextIO,
    clock: Callable[[], float],
) -> int:
    info = client.dataset(args.name)
    schema_doc = info.get("schema")
    schema = Schema.from_json(schema_doc) if schema_doc else None
    reader = open_records(args.file, fmt=args.format, key_column=args.key, schema=schema)
    results: list[dict[str, Any]] = []
    start = clock()
    try:
        with reader, Progress(reader.size, label=f"load {args.name}", unit="B", stream=err) as bar:

            def tick() -> None:
                bar.update(reader.bytes_read, note=f"{reader.records:,} records")

            if args.replace:
                records: dict[bytes, Any] = {}
                for key, record in reader:
                    records[key] = record
                    if reader.records % 4096 == 0:
                        tick()
                tick()
                if not records and not args.allow_empty:
                    raise BadRequestError(
                        f"{args.file} holds no records: --replace would delete every record of "
                        f"{args.name} (add --allow-empty to do that)"
                    )
                results.append(client.replace(args.name, records))
            else:
                for batch in batches(reader, args.batch):
                    results.append(client.write(args.name, batch))
                    tick()
            bar.update(reader.size, note=f"{reader.records:,} records")
    except ReplicadError:
        if results:
            done = sum(int(r.get("upserted", 0)) + int(r.get("deleted", 0)) for r in results)
            print(
                f"{_PROG}: {len(results)} batch(es) were committed before the error "
                f"({done:,} records changed; {args.name} is now at version "
                f"{results[-1].get('version')})",
                file=err,
            )
        raise
    seconds = max(clock() - start, 1e-9)
    n = reader.records
    if not results:
        print(f"{args.file}: no records; {args.name} unchanged", file=out)
        return 0
    first = int(results[0].get("version", 1)) - 1
    last = results[-1].get("version")
    upserted = sum(int(r.get("upserted", 0)) for r in results)
    deleted = sum(int(r.get("deleted", 0)) for r in results)
    unchanged = sum(int(r.get("unchanged", 0)) for r in results)
    versions = len(results)
    print(
        f"loaded {n:,} records into {args.name}: {versions} version{'s' * (versions != 1)} "
        f"(v{first} -> v{last}); {upserted:,} upserted, {deleted:,} deleted, "
        f"{unchanged:,} unchanged; "
        f"{seconds:.2f} s, {format_count(n / seconds)} records/s",
        file=out,
    )
    return 0


def _cmd_get(args: argparse.Namespace, client: OriginClient, out: TextIO, err: TextIO) -> int:
    doc = client.get(args.name, args.key)
    if doc is None:
        print(f"{_PROG}: {args.name} has no record {args.key!r}", file=err)
        return 1
    if args.full:
        _dump(doc, out)
    else:
        _dump(doc["record"] if "record" in doc else doc.get("value"), out)
    return 0


def _cmd_status(args: argparse.Namespace, client: OriginClient, out: TextIO) -> int:
    items = client.datasets()
    if args.json:
        _dump(items, out)
        return 0
    if not items:
        print("no datasets", file=out)
        return 0
    rows = []
    for d in items:
        queue = d.get("queue") or {}
        digest = str(d.get("digest", ""))
        rows.append(
            [
                d.get("name", "?"),
                d.get("kind", "?"),
                d.get("version", "?"),
                d.get("records", "?"),
                str(d.get("epoch", ""))[:8],
                # The digest is count (8 bytes) then xor (16): show the xor's start.
                digest[16:28] if len(digest) >= 28 else digest,
                queue.get("entries", "?") if isinstance(queue, Mapping) else "?",
            ]
        )
    _table(["DATASET", "KIND", "VERSION", "RECORDS", "EPOCH", "DIGEST", "QUEUE"], rows, out)
    return 0


def _cmd_fleet(args: argparse.Namespace, client: OriginClient, out: TextIO) -> int:
    replicas = client.fleet()
    if args.json:
        _dump(replicas, out)
        return 0
    if not replicas:
        print("no replicas have reported", file=out)
        return 0
    rows: list[list[object]] = []
    for r in replicas:
        head = [r.get("replica", "?"), r.get("address", "?"), _ago(r.get("age_seconds"))]
        datasets = r.get("datasets") or {}
        if not datasets:
            rows.append([*head, "-", "-", "-"])
        for name in sorted(datasets):
            d = datasets[name] or {}
            lag = d.get("lag")
            rows.append([*head, name, d.get("version", "?"), "other epoch" if lag is None else lag])
    _table(["REPLICA", "ADDRESS", "LAST SEEN", "DATASET", "VERSION", "LAG"], rows, out)
    return 0


def _cmd_reset(args: argparse.Namespace, client: OriginClient, out: TextIO) -> int:
    info = client.reset_history(args.name)
    if args.json:
        _dump(info, out)
        return 0
    print(
        f"{args.name}: new epoch {str(info.get('epoch', ''))[:8]} at version "
        f"{info.get('version')}; replicas will repair with Merkle sync",
        file=out,
    )
    return 0


# --- the parser --------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _client_options() -> argparse.ArgumentParser:
    """Options every client command accepts, before or after the subcommand
    (SUPPRESS keeps a subparser from resetting what the main parser read)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("origin")
    group.add_argument(
        "--origin",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"the origin's URL (default: $REPLICAD_URL, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--token", default=argparse.SUPPRESS, help="bearer token (default: $REPLICAD_TOKEN)"
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read the bearer token from FILE (first non-comment line)",
    )
    group.add_argument(
        "--cacert",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="CA bundle to verify the origin's TLS certificate",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="HTTP timeout (default: 300)",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _client_options()
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Origin of the edge replica.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"replicad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the origin")
    serve.add_argument("--config", metavar="FILE", help="TOML config file (flags override it)")
    serve.add_argument("--data", metavar="DIR", help="data directory")
    serve.add_argument("--listen", metavar="ADDR", help="HOST:PORT or unix:PATH")
    serve.add_argument("--write-token-file", metavar="F", help="write tokens, one a line")
    serve.add_argument("--read-token-file", metavar="F", help="read tokens, one a line")
    serve.add_argument("--tls-cert", metavar="F", help="TLS certificate (PEM)")
    serve.add_argument("--tls-key", metavar="F", help="TLS private key (PEM)")
    serve.add_argument("--map-size-mb", type=_positive, metavar="N", help="initial LMDB map")
    serve.add_argument("--max-body-mb", type=_positive, metavar="N", help="request body limit")
    serve.add_argument("--log-format", choices=["json", "text"], help="log lines (json)")
    serve.add_argument(
        "--no-durable", action="store_true", help="skip fsync on commit (tests only)"
    )

    create = sub.add_parser("create-dataset", help="create a dataset", parents=[common])
    create.add_argument("name", metavar="NAME")
    kind = create.add_mutually_exclusive_group(required=True)
    kind.add_argument("--schema", metavar="FILE.json", help='typed: {"fields": [...]}')
    kind.add_argument("--opaque", action="store_true", help="values are opaque bytes")
    create.add_argument("--fanout", type=_positive, metavar="N", help="Merkle fan-out")
    create.add_argument("--depth", type=_positive, metavar="N", help="Merkle depth")
    create.add_argument("--queue-max", type=_positive, metavar="N", help="version queue bound")
    create.add_argument("--policy", metavar="NAME", help="queue merge policy")
    create.add_argument("--max-value-bytes", type=_positive, metavar="N", help="value limit")
    create.add_argument("--json", action="store_true", help="print the DatasetInfo as JSON")

    evolve = sub.add_parser("evolve-schema", help="append fields to a schema", parents=[common])
    evolve.add_argument("name", metavar="NAME")
    evolve.add_argument("--schema", metavar="FILE.json", required=True, help="the new schema")
    evolve.add_argument("--json", action="store_true", help="print the DatasetInfo as JSON")

    load = sub.add_parser("load", help="load a CSV or JSON-lines file", parents=[common])
    load.add_argument("name", metavar="NAME")
    load.add_argument("file", metavar="FILE")
    load.add_argument("--key", default="key", metavar="COLUMN", help="key column (key)")
    load.add_argument("--format", choices=FORMATS, help="default: from the file name")
    load.add_argument(
        "--batch", type=_positive, default=10_000, metavar="N", help="records per version"
    )
    load.add_argument(
        "--replace",
        action="store_true",
        help="the file becomes the whole dataset, as one version of only the changes",
    )
    load.add_argument(
        "--allow-empty",
        action="store_true",
        help="with --replace, let an empty file empty the dataset",
    )

    get = sub.add_parser("get", help="print one record as JSON", parents=[common])
    get.add_argument("name", metavar="NAME")
    get.add_argument("key", metavar="KEY")
    get.add_argument("--full", action="store_true", help="with key and version")

    status = sub.add_parser("status", help="list the datasets", parents=[common])
    status.add_argument("--json", action="store_true", help="print JSON")

    fleet = sub.add_parser("fleet", help="list the replicas", parents=[common])
    fleet.add_argument("--json", action="store_true", help="print JSON")

    reset = sub.add_parser("reset-history", help="start a new epoch", parents=[common])
    reset.add_argument("name", metavar="NAME")
    reset.add_argument("--json", action="store_true", help="print the DatasetInfo as JSON")

    demo = sub.add_parser("demo", help="walk through the sync core in one process")
    demo.add_argument("--records", type=int, default=20_000, help="records to load (>= 20)")
    return parser


def _make_client(args: argparse.Namespace, environ: Mapping[str, str]) -> OriginClient:
    url = getattr(args, "origin", None) or environ.get("REPLICAD_URL") or DEFAULT_URL
    token = getattr(args, "token", None)
    token_file = getattr(args, "token_file", None)
    if token is None and token_file is not None:
        token = _read_token_file(token_file)
    if token is None:
        token = environ.get("REPLICAD_TOKEN") or None
    cacert = getattr(args, "cacert", None)
    return OriginClient(
        url,
        token=token,
        timeout=getattr(args, "timeout", 300.0),
        verify=cacert if cacert is not None else True,
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run one command; return the exit status (see the module docstring).

    ``stdout``/``stderr``/``environ`` default to the process's; ``clock``
    times ``load``. Usage errors raise SystemExit(2) (argparse)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            if args.records < 20:
                parser.error("--records must be at least 20")
            from replicad.demo import run

            run(args.records)
            return 0
        if args.command == "serve":
            return _cmd_serve(args)
        with _make_client(args, env) as client:
            match args.command:
                case "create-dataset":
                    return _cmd_create(args, client, out)
                case "evolve-schema":
                    return _cmd_evolve(args, client, out)
                case "load":
                    return _cmd_load(args, client, out, err, clock)
                case "get":
                    return _cmd_get(args, client, out, err)
                case "status":
                    return _cmd_status(args, client, out)
                case "fleet":
                    return _cmd_fleet(args, client, out)
                case "reset-history":
                    return _cmd_reset(args, client, out)
        parser.error(f"unknown command {args.command}")  # pragma: no cover
    except ReplicadError as exc:
        print(f"{_PROG}: error: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
