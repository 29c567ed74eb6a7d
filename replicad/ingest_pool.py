"""Ingest worker processes: large write bodies decoded and encoded beside
the origin process (the trio adapter around :mod:`replicad.ingest`).

Workers are ``trio_parallel`` processes (spawned, so they share nothing with
the origin but the code), started in the background when the origin starts
(:meth:`IngestPool.warm`) and retired after ten idle minutes (the next large
body starts them again). Each job carries the dataset's committed
definition, so a worker needs no other state; it keeps a codec per dataset
and extends it as the dictionary grows.

A worker that dies (killed, out of memory) fails only the job it ran: the
body is then decoded in the origin process, as with no workers, and the
next job starts a fresh worker. A worker that runs other code than the
origin (:func:`encoder_tag`: the package was upgraded under
a running origin) refuses its job, and the pool stops sending bodies to
workers: any new one would run the new code too. A worker that cannot be
started at all leaves every body to the origin process. If the origin is
killed, its workers see their pipe close and exit.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio_parallel
import xxhash

from replicad.errors import StaleEncodingError
from replicad.http_body import HttpError
from replicad.ingest import prepare_write
from replicad.origin_types import EncodingBasis, WriteBatch

__all__ = ["IngestPool", "encoder_tag", "open_ingest_pool"]

log = logging.getLogger("replicad.ingest")

IDLE_TIMEOUT = 600.0
"""Seconds an idle worker waits for a job before it exits."""


_ENCODER_MODULES = (
    "replicad.codec",
    "replicad.layout",
    "replicad.schema",
    "replicad.errors",
    "replicad.origin_types",
    "replicad.http_body",
    "replicad.ingest",
    "replicad.ingest_pool",
)
_ENCODER_PACKAGES = ("replicad", "msgspec", "msgpack", "cramjam", "xxhash")


def _digest_of_code() -> str:
    h = xxhash.xxh3_64()
    for name in _ENCODER_PACKAGES:
        try:
            h.update(f"{name}={importlib.metadata.version(name)};".encode())
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            h.update(f"{name}=?;".encode())
    for name in _ENCODER_MODULES:
        spec = importlib.util.find_spec(name)
        origin = None if spec is None else spec.origin
        try:
            if origin is None:
                raise OSError(f"no source file for {name}")
            with open(origin, "rb") as f:
                h.update(f.read())
        except OSError:  # pragma: no cover - a zip import, say: versions only
            h.update(name.encode())
    return h.hexdigest()


_TAG = _digest_of_code()


def encoder_tag() -> str:
    """A digest of the code that decides what a body encodes to: the
    source of those modules and the versions of the packages involved,
    taken when this module was imported (in a worker: when it started). The
    origin sends its own with each job and a worker whose tag differs
    refuses the job: a worker started after the package was upgraded in
    place (workers are started again after idling) must not encode
    differently from the origin it serves."""
    return _TAG


def _prepare_in_worker(
    basis: EncodingBasis, body: bytes, is_json: bool, replace: bool, tag: str
) -> WriteBatch:
    """The job a worker runs: :func:`replicad.ingest.prepare_write`, refused
    with StaleEncodingError when the origin's ``tag`` is not this worker's."""
    if tag != _TAG:
        raise StaleEncodingError(f"this worker runs other code ({_TAG}, not {tag})")
    return prepare_write(basis, body, is_json, replace)


class IngestPool:
    """Runs :func:`replicad.ingest.prepare_write` in up to ``workers``
    processes at once; bodies below ``min_bytes`` are not worth the trip."""

    def __init__(
        self,
        context: trio_parallel.WorkerContext,
        workers: int,
        min_bytes: int,
        *,
        tag: str | None = None,
    ) -> None:
        """``tag``: the origin's :func:`encoder_tag` (tests pass another to
        play an origin running other code)."""
        self._context = context
        self._limiter = trio.CapacityLimiter(workers)
        self._tag = encoder_tag() if tag is None else tag
        self.workers = workers
        self.min_bytes = min_bytes
        self.disabled = False
        """Set when the workers run other code than this origin: every body
        is decoded in process from then on (until the origin restarts)."""

    async def warm(self) -> None:
        """Start every worker now (each imports the codec, about a quarter
        of a second), so that the first large body does not wait for it."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._warm_one)

    async def _warm_one(self) -> None:
        try:
            await self._context.run_sync(_ready, limiter=self._limiter)
        except Exception as exc:  # OSError (a process limit, say) included
            log.warning("ingest worker did not start", extra={"error": repr(exc)})

    def wants(self, body: bytes) -> bool:
        """Whether ``body`` is large enough to go to a worker."""
        return len(body) >= self.min_bytes and not self.disabled

    async def prepare(
        self, basis: EncodingBasis, body: bytes, is_json: bool, replace: bool
    ) -> WriteBatch | None:
        """The pre-encoded batch of ``body``, or None if no worker could do
        it (the caller then decodes in process). Raises
        :class:`~replicad.http_body.HttpError` for a malformed body."""
        try:
            batch: WriteBatch = await self._context.run_sync(
                _prepare_in_worker,
                basis,
                body,
                is_json,
                replace,
                self._tag,
                limiter=self._limiter,
                kill_on_cancel=True,
            )
        except HttpError:
            raise
        except StaleEncodingError as exc:
            # a worker running other code: so would every new one (they start
            # from the package on disk), so stop sending bodies to them
            self.disabled = True
            log.error(
                "ingest workers run other code than this origin (upgraded in place?); "
                "every body is decoded in process until the origin restarts",
                extra={"error": str(exc)},
            )
            return None
        except (
            trio_parallel.BrokenWorkerError,
            trio.ClosedResourceError,
            OSError,  # a worker that cannot be started
        ) as exc:
            log.warning("ingest worker failed; decoding in process", extra={"error": repr(exc)})
            return None
        except Exception:  # a bug in the worker: keep serving, but say so
            log.exception("ingest worker raised; decoding in process")
            return None
        return batch


def _ready() -> bool:
    """Run in a new worker: importing this module imported the codec."""
    return True


@asynccontextmanager
async def open_ingest_pool(workers: int, min_bytes: int) -> AsyncIterator[IngestPool | None]:
    """An :class:`IngestPool` for the ``async with`` block (None when
    ``workers`` is 0). Leaving the block waits for running jobs, then stops
    the workers (killing any that do not exit within a few seconds)."""
    if workers <= 0:
        yield None
        return
    leaving: BaseException | None = None
    try:
        async with trio_parallel.open_worker_context(
            idle_timeout=IDLE_TIMEOUT, grace_period=5.0
        ) as context:
            try:
                yield IngestPool(context, workers, max(1, min_bytes))
            except BaseException as exc:
                leaving = exc
                raise
    except trio_parallel.BrokenWorkerError as exc:
        # a worker ended abnormally (killed by a signal sent to the whole
        # process group, say) or had to be killed at exit: only worth a line,
        # and never in place of the error the block was leaving with
        log.warning("an ingest worker ended abnormally at shutdown", extra={"error": repr(exc)})
        if leaving is not None:
            raise leaving from None
