"""Run the sidecar as a process: the mirror, the sync loop, the health port,
and the Redis-protocol socket (:mod:`sidecar.resp_server`).

``serve`` is the trio entry point (tests start it in a nursery); ``run``
blocks, installing SIGTERM/SIGINT handlers that cancel the loop. Cancelling
waits for an Apply in progress (LMDB worker threads are not abandoned), so
a stop never leaves a half-written transaction: it commits or never began.
"""

from __future__ import annotations

import logging
import signal
import ssl
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

import hypercorn.config
import hypercorn.trio
import trio

from replicad import __version__
from replicad.client import AsyncSyncClient
from replicad.config import check_tls_files
from replicad.errors import ConfigError, ReplicadError
from replicad.replica import SyncConfig
from sidecar.agent import Agent, AgentSettings, SyncTransport
from sidecar.config import SidecarConfig
from sidecar.health import HealthApp
from sidecar.mirror import Mirror
from sidecar.resp_server import SocketService, SocketSettings, sync_status_of

log = logging.getLogger("sidecar")


def socket_settings_of(config: SidecarConfig) -> SocketSettings | None:
    """The socket's settings, or None when no socket is configured."""
    if config.socket is None:
        return None
    return SocketSettings(
        path=config.socket,
        mode=config.socket_mode,
        group=config.socket_group,
        workers=config.socket_workers,
        slice_us=config.socket_slice_us,
        max_clients=config.socket_max_clients,
        idle_timeout=config.socket_idle_timeout,
        max_request_bytes=config.socket_max_request_bytes,
        view_max_age=config.socket_view_max_age,
    )


def settings_of(config: SidecarConfig) -> AgentSettings:
    return AgentSettings(
        datasets=config.datasets,
        replica_id=config.replica_id,
        sync=SyncConfig(poll_interval=config.poll_interval),
        request_timeout=config.request_timeout,
        ack_interval=config.ack_interval,
        max_staleness=config.max_staleness,
        hints=config.hints,
        push=config.push,
        apply_nice=config.apply_nice,
    )


async def serve(
    config: SidecarConfig,
    *,
    transport: SyncTransport | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled. ``task_status.started`` gets the health port's
    bound addresses (empty without a health port)."""
    mirror = Mirror(
        config.data,
        map_size=config.map_size_mb << 20,
        max_map_size=config.max_map_size_mb << 20,
        max_readers=config.max_readers,
        durable=config.durable,
        file_mode=config.file_mode,
        json_views=config.json_views,
    )
    async with AsyncExitStack() as stack:
        stack.callback(mirror.close)
        if transport is None:
            verify: bool | ssl.SSLContext = True
            if config.ca_file is not None:
                verify = ssl.create_default_context(cafile=str(config.ca_file))
            client = AsyncSyncClient(config.origin, token=config.token, verify=verify)
            stack.push_async_callback(client.aclose)
            transport = client
        agent = Agent(mirror, transport, settings_of(config))
        relay = None
        if config.serve_sync is not None:
            # imported only here: the HTTP app and its ingest machinery are
            # a fifth of a plain sidecar's start-up time
            from sidecar.relay import RelayService

            relay = RelayService(mirror, registry=agent.registry)
            for ds in agent.datasets.values():
                ds.on_applied = relay.publish
        async with trio.open_nursery() as nursery:
            # ports first: a port in use fails the start before any sync work
            binds: list[str] = []
            if relay is not None and config.serve_sync is not None:
                from replicad.http_app import OriginApp

                app = OriginApp(relay, read_tokens=config.relay_read_tokens)
                rconfig = hypercorn.config.Config()
                rconfig.bind = [config.serve_sync.bind()]
                rconfig.accesslog = None
                rconfig.errorlog = None
                if config.relay_tls_cert is not None and config.relay_tls_key is not None:
                    check_tls_files(
                        config.relay_tls_cert, config.relay_tls_key, "relay_tls_cert/relay_tls_key"
                    )
                    rconfig.certfile = str(config.relay_tls_cert)
                    rconfig.keyfile = str(config.relay_tls_key)
                with _listen_errors(config.serve_sync):
                    relay_binds = await nursery.start(hypercorn.trio.serve, app, rconfig)
                log.info("relay serving the sync API", extra={"binds": relay_binds})
            if config.health is not None:
                hconfig = hypercorn.config.Config()
                hconfig.bind = [config.health.bind()]
                hconfig.accesslog = None
                hconfig.errorlog = None
                with _listen_errors(config.health):
                    binds = await nursery.start(hypercorn.trio.serve, HealthApp(agent), hconfig)
            socket_settings = socket_settings_of(config)
            if socket_settings is not None:
                sockets = SocketService(
                    socket_settings,
                    mirror=config.data,
                    status=lambda: sync_status_of(agent),
                    log_format=config.log_format,
                    sidecar_version=__version__,
                )
                await nursery.start(sockets.run)
            await nursery.start(agent.run)
            log.info(
                "sidecar running",
                extra={
                    "origin": config.origin,
                    "datasets": list(config.datasets),
                    "health": binds,
                    "socket": None if config.socket is None else str(config.socket),
                },
            )
            task_status.started(binds)


@contextmanager
def _listen_errors(address: object) -> Iterator[None]:
    """A port that cannot be bound becomes a one-line ConfigError naming it
    (hypercorn raises OSError, possibly inside an exception group)."""
    try:
        yield
    except (OSError, BaseExceptionGroup) as exc:
        err = _single(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(err, OSError):
            raise ConfigError(f"cannot listen on {address}: {err.strerror or err}") from err
        raise


def run(config: SidecarConfig) -> None:
    """Block until SIGTERM or SIGINT, then stop cleanly."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await nursery.start(serve, config)
                async for signum in signals:
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        raise _single(group) from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a start-up failure is about (trio wraps errors of a
    nursery's tasks in groups), so the CLI can print it as one line."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, ReplicadError | OSError):
            return leaf
    return group
