"""Serving an ASGI app with hypercorn's trio worker: the shared way to listen for HTTP."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def hypercorn_config(bind: str, *, cert_file: str | None = None, key_file: str | None = None,
                     read_timeout: float = 30.0, keep_alive: float = 75.0,
                     max_header_bytes: int = 16 * 1024) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.read_timeout = max(1, math.ceil(read_timeout))  # whole seconds; 0 would mean "no timeout"
    config.keep_alive_timeout = keep_alive
    config.h11_max_incomplete_size = max_header_bytes
    config.graceful_timeout = 5
    config.alpn_protocols = ["http/1.1"]
    if cert_file and key_file:
        config.certfile = cert_file
        config.keyfile = key_file
    return config


async def serve(app: ASGIApp, config: HypercornConfig, *,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; `task_status.started()` gets the bound addresses once listening."""
    await hypercorn_serve(app, config, mode="asgi", task_status=task_status)  # type: ignore[arg-type]


async def respond(send: Send, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
