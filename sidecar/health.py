"""The sidecar's health port: ``/healthz`` (alive), ``/readyz`` (every
dataset synced and fresh), ``/metrics`` (Prometheus) and ``/status`` (JSON).

A raw ASGI app: four read-only routes do not need a framework.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sidecar.agent import Agent

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _reply(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class HealthApp:
    """ASGI app over one :class:`~sidecar.agent.Agent`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            await _reply(send, 405, _json({"error": "method not allowed"}), "application/json")
            return
        if path == "/healthz":
            await _reply(send, 200, _json({"status": "ok"}), "application/json")
        elif path == "/readyz":
            ready = self.agent.ready()
            body = _json({"ready": ready, "datasets": self.agent.status()})
            await _reply(send, 200 if ready else 503, body, "application/json")
        elif path == "/metrics":
            text = self.agent.registry.render().encode()
            await _reply(send, 200, text, "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/status":
            doc = {
                "replica": self.agent.settings.replica_id,
                "ready": self.agent.ready(),
                "datasets": self.agent.status(),
            }
            await _reply(send, 200, _json(doc), "application/json")
        else:
            await _reply(send, 404, _json({"error": f"no route {path}"}), "application/json")
