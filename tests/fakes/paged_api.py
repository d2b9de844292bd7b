"""A fake audit-log list API in incident.io's conventions (protocols.md 1.4), for the `poll` source.

    GET /v1/audit_logs?page_size=N&after=CURSOR&occurred_at[gte]=RFC3339   Authorization: Bearer <key>
    200 {"audit_logs": [...], "pagination_meta": {"after": "<cursor>", "page_size": N}}

Entries are served oldest first; `after` is an opaque cursor naming the last entry returned and is absent
on the last page (or, with `link=True`, the next page is given as `Link: <url>; rel="next"`). Errors use
incident.io's envelope; 429 carries `rate_limit.retry_after` as an HTTP date and no Retry-After header,
as documented. Faults are queued: each request takes the next one first.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import trio

from relay.entry import parse_occurred_at

Fault = str
"""`429`: rate limited (body only); `429-header`: with a Retry-After header; `500`, `502`: server errors;
`malformed`: a 200 without `audit_logs`; `html`: a 200 that is not JSON; `401`: credentials refused."""


def _cursor(index: int) -> str:
    return base64.urlsafe_b64encode(f"idx:{index}".encode()).decode()


def _index(cursor: str) -> int:
    return int(base64.urlsafe_b64decode(cursor.encode()).decode().removeprefix("idx:"))


@dataclass
class PagedApi:
    token: str = "test-api-key"
    entries: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    link: bool = False
    retry_after: float = 30.0
    """Seconds ahead of now that a 429 names in `rate_limit.retry_after`."""
    requests: list[dict[str, str]] = field(default_factory=list)
    """The query of every request, in order (with `_status` and `_at`, the trio time, added)."""
    before_page: Callable[[dict[str, str]], Awaitable[None]] | None = None
    """Awaited before a page is served (tests hold a request here to stop the poller between pages)."""
    changed: trio.Event = field(default_factory=trio.Event)

    async def wait_requests(self, count: int) -> None:
        while len(self.requests) < count:
            await self.changed.wait()

    def served(self) -> list[dict[str, str]]:
        return [r for r in self.requests if r["_status"] == "200"]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        query = dict(parse_qsl(scope["query_string"].decode(), keep_blank_values=True))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, body, extra = await self._answer(scope, query, headers)
        self.requests.append({**query, "_status": str(status), "_at": str(trio.current_time())})
        self.changed.set()
        self.changed = trio.Event()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: dict[str, Any], query: dict[str, str], headers: dict[str, str]
                      ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        if scope["path"] != "/v1/audit_logs":
            return self._error(404, "not_found", "no such endpoint")
        fault = self.faults.pop(0) if self.faults else None
        if fault == "401" or headers.get("authorization") != f"Bearer {self.token}":
            return self._error(401, "authentication_error", "Missing or invalid authorization",
                               "missing_authorization_material")
        if fault in ("429", "429-header"):
            body = {"type": "too_many_requests", "status": 429, "request_id": "8f5c7c0e",
                    "rate_limit": {"name": "api_key_name", "limit": 1200, "remaining": 0,
                                   "retry_after": formatdate(time.time() + self.retry_after, usegmt=True)},
                    "errors": [{"code": "too_many_requests",
                                "message": "Too many requests. We recommend exponential backoff."}]}
            extra = [(b"retry-after", b"2")] if fault == "429-header" else []
            return 429, orjson.dumps(body), extra
        if fault in ("500", "502"):
            return self._error(int(fault), "internal_error", "Something went wrong")
        if self.before_page is not None:
            await self.before_page(query)
        if fault == "html":
            return 200, b"<html>maintenance</html>", [(b"content-type", b"text/html")]
        page_size = min(int(query.get("page_size", "25")), 250)
        start = _index(query["after"]) if query.get("after") else 0
        since = parse_occurred_at(query["occurred_at[gte]"]) if "occurred_at[gte]" in query else None
        page: list[dict[str, Any]] = []
        index = start
        while index < len(self.entries) and len(page) < page_size:
            item = self.entries[index]
            index += 1
            if since is None or parse_occurred_at(item["occurred_at"]) >= since:
                page.append(item)
        more = index < len(self.entries)
        if fault == "malformed":
            return 200, orjson.dumps({"data": page}), []
        meta: dict[str, Any] = {"page_size": page_size}
        extra: list[tuple[bytes, bytes]] = []
        if more and self.link:
            next_query = {**query, "after": _cursor(index)}
            url = f"{scope['scheme']}://{headers['host']}{scope['path']}?{urlencode(next_query)}"
            extra.append((b"link", f'<{url}>; rel="next"'.encode()))
        elif more:
            meta["after"] = _cursor(index)
        return 200, orjson.dumps({"audit_logs": page, "pagination_meta": meta}), extra

    @staticmethod
    def _error(status: int, kind: str, message: str, code: str | None = None
               ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        body = {"type": kind, "status": status, "request_id": "3f1e0c1d",
                "errors": [{"code": code or kind, "message": message}]}
        return status, orjson.dumps(body), []
