"""The operator's HTTP endpoint: `/metrics` (Prometheus), `/healthz` (alive) and `/readyz` (ready)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.asgi import ASGIApp, Receive, Scope, Send, lifespan, respond
from relay.metrics import REGISTRY


def endpoint_app(readiness: Callable[[], tuple[bool, str]]) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed\n", headers=[(b"allow", b"GET, HEAD")])
        elif path == "/metrics":
            await respond(send, 200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            await respond(send, 200, b"ok\n")
        elif path == "/readyz":
            ready, detail = readiness()
            await respond(send, 200 if ready else 503, f"{detail}\n".encode())
        else:
            await respond(send, 404, b"not found: try /metrics, /healthz or /readyz\n")

    return app
