"""Serving an ASGI app with hypercorn's trio worker: the shared way to listen for HTTP.

Log events: `http_connection_failed` (warning, at most one line per 10 s per process, then with
`similar_not_logged`): hypercorn failed on one connection, which was closed; the listener carries on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.trio.run as hypercorn_run
import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer

log = structlog.get_logger("relay.asgi")

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
    # Connections the kernel completes before the event loop accepts them (capped by net.core.somaxconn).
    # Hypercorn's 100 overflows in a burst of connections, and each SYN dropped then costs its client a
    # retransmission one second or more later.
    config.backlog = 4096
    config.alpn_protocols = ["http/1.1"]
    if cert_file and key_file:
        config.certfile = cert_file
        config.keyfile = key_file
    return config


class _ContainedConnection(TCPServer):
    """Hypercorn's handler of one connection, with its failures kept to that connection.

    Hypercorn runs each connection in the listener's nursery and lets any exception but OSError out of it,
    which closes the listening socket and every other connection. One client could cause that: a request
    half-closed at once (with an absurd Content-Length, say) makes hypercorn shut the socket for writing
    (`send_eof`, outside its send lock) while an answer is being written, and the write fails with
    BusyResourceError. That stopped the push receiver, and through the metrics endpoint the whole relay.
    Such a write now counts as a connection that went away (as hypercorn treats a broken one), and anything
    else that escapes is logged and closes only this connection. Cancellation still passes through.
    """

    _last_logged = -float("inf")
    _not_logged = 0

    async def protocol_send(self, event: Event) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    async def run(self) -> None:
        try:
            await super().run()
        except Exception as exc:
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]
            self._log(f"{type(cause).__name__}: {cause}")
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.stream.aclose()

    @classmethod
    def _log(cls, error: str) -> None:
        now = time.monotonic()
        if now - cls._last_logged < 10.0:
            cls._not_logged += 1
            return
        skipped, cls._not_logged, cls._last_logged = cls._not_logged, 0, now
        log.warning("http_connection_failed", error=error[:300], hint="that connection was closed; others carry on",
                    **({"similar_not_logged": skipped} if skipped else {}))


# What hypercorn's trio worker builds for each connection (looked up when a listener starts).
hypercorn_run.TCPServer = _ContainedConnection  # type: ignore[attr-defined]


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
