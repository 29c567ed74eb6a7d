"""The origin process: store, service and HTTP app under hypercorn on trio.

Theory of operation
-------------------
:func:`serve` owns everything for its lifetime, in this order::

    OriginStore (LMDB)  ->  OriginService (group committer in a nursery)
                        ->  IngestPool (worker processes for large bodies)
                        ->  OriginApp (ASGI)  ->  hypercorn (TCP or unix, TLS)

It returns when ``shutdown_trigger`` returns (or is cancelled): the app's hint
streams are ended first (:meth:`OriginApp.shutdown`), hypercorn stops
accepting and lets in-flight requests finish (their writes are still committed:
the committer runs until hypercorn is done), then the committer is cancelled
and the store is closed (saving the Merkle trees for a fast restart).

:func:`run_server` is the blocking entry point of ``replicad serve``: it sets
up logging, runs :func:`serve` under ``trio.run`` and turns SIGTERM or SIGINT
into a graceful shutdown. ``python -m replicad.server`` does the same from a
few flags (used by the tests, which start real server processes).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from replicad.config import OriginConfig, check_tls_files, load
from replicad.errors import ReplicadError
from replicad.http_app import DEFAULT_PING_INTERVAL, OriginApp
from replicad.ingest_pool import IngestPool, open_ingest_pool
from replicad.logs import setup_logging
from replicad.service import OriginService
from replicad.store import OriginStore

__all__ = ["main", "run_server", "serve"]

log = logging.getLogger("replicad.server")

ShutdownTrigger = Callable[[], Awaitable[None]]


def hypercorn_config(config: OriginConfig) -> HypercornConfig:
    """The hypercorn settings for ``config``: one bind, TLS when configured,
    no access log (the app logs each request itself)."""
    hc = HypercornConfig()
    hc.bind = [config.listen.bind()]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 5.0
    hc.include_server_header = False
    if config.tls_cert is not None and config.tls_key is not None:
        hc.certfile = str(config.tls_cert)
        hc.keyfile = str(config.tls_key)
    return hc


async def serve(
    config: OriginConfig,
    *,
    shutdown_trigger: ShutdownTrigger | None = None,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the origin described by ``config`` until ``shutdown_trigger``
    returns (forever when None; cancel the caller's scope to stop).

    ``task_status.started(addresses)`` is called once the socket listens, with
    the bound addresses (``http://127.0.0.1:7070``, ``https://...``, or the
    unix path). Raises StorageError if the store cannot be opened; the store
    is closed on every exit path.
    """
    if config.tls_cert is not None and config.tls_key is not None:
        check_tls_files(config.tls_cert, config.tls_key, "tls_cert/tls_key")
    store = OriginStore(
        config.data,
        map_size=config.map_size_mb << 20,
        max_map_size=config.max_map_size_mb << 20,
        durable=config.durable,
        push_max_bytes=config.push_max_kb << 10,
    )
    service: OriginService | None = None
    try:
        service = OriginService(store, group_commit_max=config.group_commit_max)
        # the workers outlive hypercorn: a request in flight at shutdown
        # still gets its body encoded and committed
        async with open_ingest_pool(
            config.ingest_workers, config.ingest_offload_kb << 10
        ) as ingest:
            await _serve_app(
                config,
                service,
                ingest,
                shutdown_trigger=shutdown_trigger,
                ping_interval=ping_interval,
                task_status=task_status,
            )
    finally:
        if service is not None:
            service.close()
        else:
            store.close()
        log.info("stopped")


async def _serve_app(
    config: OriginConfig,
    service: OriginService,
    ingest: IngestPool | None,
    *,
    shutdown_trigger: ShutdownTrigger | None,
    ping_interval: float,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """The app and hypercorn over ``service``, until the trigger fires."""
    app = OriginApp(
        service,
        write_tokens=config.write_tokens,
        read_tokens=config.read_tokens,
        max_body_bytes=config.max_body_mb << 20,
        ping_interval=ping_interval,
        ingest=ingest,
    )
    if not config.auth_enabled:
        log.warning("no tokens configured: authentication is off")
    if not config.durable:
        log.warning("durable = false: commits are not fsynced")

    async def trigger() -> None:
        try:
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
        finally:
            log.info("shutting down")
            app.shutdown()

    async with trio.open_nursery() as committer:
        await committer.start(service.run)
        if ingest is not None:
            committer.start_soon(ingest.warm)
        async with trio.open_nursery() as server:
            binds: list[str] = await server.start(
                partial(
                    hypercorn_serve,
                    cast(Any, app),
                    hypercorn_config(config),
                    shutdown_trigger=trigger,
                )
            )
            log.info(
                "listening",
                extra={
                    "address": binds[0] if binds else config.listen.bind(),
                    "tls": config.tls_cert is not None,
                    "datasets": len(service.datasets()),
                },
            )
            task_status.started(binds)
        # Hypercorn returned: the trigger fired and in-flight requests
        # finished (their writes committed); now stop the committer.
        committer.cancel_scope.cancel()


async def _serve_until_signal(config: OriginConfig, ping_interval: float) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def on_signal() -> None:
            async for signum in signals:
                log.info("signal", extra={"signal": signal.Signals(signum).name})
                return

        await serve(config, shutdown_trigger=on_signal, ping_interval=ping_interval)


def run_server(config: OriginConfig, *, ping_interval: float = DEFAULT_PING_INTERVAL) -> None:
    """Run the origin until SIGTERM or SIGINT (blocking). Sets up logging in
    ``config.log_format``. Raises StorageError if the store cannot be opened."""
    setup_logging(config.log_format)
    trio.run(_serve_until_signal, config, ping_interval)


def main(argv: list[str] | None = None) -> int:
    """``python -m replicad.server --data DIR --listen ADDR [--config FILE]
    [--no-durable] [--ping-interval S]``; tokens come from the config file or
    ``REPLICAD_WRITE_TOKENS`` / ``REPLICAD_READ_TOKENS``."""
    parser = argparse.ArgumentParser(prog="python -m replicad.server")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--data", help="data directory")
    parser.add_argument("--listen", help="HOST:PORT or unix:PATH")
    parser.add_argument("--max-body-mb", type=int, help="request body limit in MiB")
    parser.add_argument("--log-format", choices=["json", "text"])
    parser.add_argument("--no-durable", action="store_true", help="do not fsync (tests only)")
    parser.add_argument(
        "--ping-interval",
        type=float,
        default=DEFAULT_PING_INTERVAL,
        help="seconds between SSE keep-alive comments",
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        "data": args.data,
        "listen": args.listen,
        "max_body_mb": args.max_body_mb,
        "log_format": args.log_format,
    }
    if args.no_durable:
        overrides["durable"] = False
    try:
        config = load(args.config, overrides)
        if args.ping_interval <= 0:
            parser.error("--ping-interval must be > 0")
        run_server(config, ping_interval=args.ping_interval)
    except ReplicadError as exc:
        print(f"replicad: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
