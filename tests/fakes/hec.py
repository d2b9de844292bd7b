"""A fake Splunk HTTP Event Collector, written from the protocol reference (no Splunk can run here).

What it does, as Splunk documents and was observed to do (../shared/reference/protocols.md, section 3):
- `POST /services/collector/event` (aliases `/services/collector`, `/services/collector/event/1.0`):
  concatenated JSON envelopes, optionally gzip (`deflate` -> 415). Envelopes are checked in order; at the
  first bad one (index N) the events before it stay indexed and the reply names N in
  `invalid-event-number`: code 6 bad JSON / not an object / wrong field types, 12 no `event`, 13 blank
  `event`, 15 nested or non-object `fields`, 7 an index the token may not use (optionally naming N+1, as one
  real probe did). Empty body -> 5 "No data". Body over `max_content_length` -> 413.
- Auth: `Authorization: Splunk <token>` or HTTP Basic with the token as password; `?token=` only when
  query-string auth is on (else 16). No header -> 401 code 2, unreadable header -> 401 code 3, unknown
  token -> 403 code 4, disabled token -> 403 code 1.
- Indexer acknowledgement for tokens with `use_ack`: a channel is required (header
  `X-Splunk-Request-Channel` or `?channel=`; missing -> 10, not a GUID -> 11); each accepted request gets an
  `ackId` counted from 0 per channel; `POST /services/collector/ack` with `{"acks": [ids]}` answers
  `{"acks": {"id": bool}}`, `true` only once (then the id is forgotten); unknown ids and other channels say
  false; on a token without ack -> 400 code 14.
- `GET /services/collector/health` -> 200 code 17 (it does not check the token), or 503 with 18-20.
- Unknown path -> 404 code 404; GET on the event endpoint -> 405.

Test controls: `fail_next()` scripts replies (503 code 9 storms, 500 code 8, 429 with Retry-After, ...),
`ack_mode` (`immediate`, `manual` with `confirm()`, `lost`), `restart()` forgets every channel,
`tokens[...]` can be disabled, revoked or re-enabled while running. Everything received is recorded.

Run standalone (for benchmarks): `python tests/fakes/hec.py --port 0 --port-file F --token T [--ack]`.
`GET /fake/stats` then returns the counters (not a Splunk endpoint).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import gzip
import json
import re
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import orjson
import trio

from relay import asgi

EVENT_PATHS = {"/services/collector/event", "/services/collector", "/services/collector/event/1.0"}
ACK_PATHS = {"/services/collector/ack", "/services/collector/ack/1.0"}
HEALTH_PATHS = {"/services/collector/health", "/services/collector/health/1.0"}
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEALTH_TEXT = {17: "HEC is healthy", 18: "HEC is unhealthy, queues are full",
                19: "HEC is unhealthy, ack service unavailable",
                20: "HEC is unhealthy, queues are full, ack service unavailable"}


@dataclass
class Token:
    value: str
    enabled: bool = True
    use_ack: bool = False
    indexes: set[str] | None = None
    """Indexes the token may write to (None: any)."""
    default_index: str = "main"


@dataclass
class Indexed:
    """One event Splunk stored."""

    envelope: dict[str, Any]
    channel: str | None
    request: int

    @property
    def event(self) -> Any:
        return self.envelope["event"]


@dataclass
class Received:
    """One HTTP request as the fake saw it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, list[str]]
    body: bytes
    """Decoded (gunzipped) body."""
    status: int = 0
    reply: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fault:
    status: int
    reply: dict[str, Any] | bytes
    headers: list[tuple[bytes, bytes]]


@dataclass
class _Channel:
    next_id: int = 0
    acks: dict[int, bool] = field(default_factory=dict)
    """Outstanding ack ids -> indexed yet? (removed once reported true)."""


class FakeHec:
    """The ASGI app plus its recorded state; serve it with `serve()` or `relay.asgi.serve`."""

    def __init__(self, tokens: list[Token], *, query_auth: bool = False, max_content_length: int = 1_000_000,
                 index_error_off_by_one: bool = False) -> None:
        self.tokens = {t.value: t for t in tokens}
        self.query_auth = query_auth
        self.max_content_length = max_content_length
        self.index_error_off_by_one = index_error_off_by_one
        self.ack_mode: Literal["immediate", "manual", "lost"] = "immediate"
        self.health = 17
        self.events: list[Indexed] = []
        self.requests: list[Received] = []
        self.record_requests = True
        self.keep_events = True
        """False (benchmarks): count events and their distinct `event.id`s instead of keeping them."""
        self.event_count = 0
        self.first_event_at: float | None = None
        self.last_event_at: float | None = None
        self.distinct_ids: set[str] = set()
        self.faults: deque[Fault] = deque()
        self.poisoned: list[tuple[Any, int, str, bool]] = []
        self.channels: dict[str, _Channel] = {}
        self.event_requests = 0
        self.ack_requests = 0
        self.changed = trio.Event() if _in_trio() else None
        self.url = ""

    # -- test controls ---------------------------------------------------------------------------------

    def fail_next(self, count: int = 1, *, code: int | None = 9, status: int = 503, text: str = "Server is busy",
                  retry_after: str | None = None, body: bytes | None = None) -> None:
        """Answer the next `count` authenticated event requests with this reply instead of indexing."""
        headers = [(b"retry-after", retry_after.encode())] if retry_after else []
        reply: dict[str, Any] | bytes = body if body is not None else {"text": text, "code": code}
        for _ in range(count):
            self.faults.append(Fault(status, reply, headers))

    def confirm(self) -> int:
        """`manual` ack mode: mark every outstanding ack id as indexed; returns how many."""
        count = 0
        for channel in self.channels.values():
            for ack_id, done in channel.acks.items():
                if not done:
                    channel.acks[ack_id] = True
                    count += 1
        return count

    def restart(self) -> None:
        """Splunk restarted: channels and their ack ids are forgotten (ids count from 0 again)."""
        self.channels.clear()

    def ids(self, key: str = "occurred_at") -> list[Any]:
        """`event[key]` of every indexed event, in arrival order (duplicates included)."""
        return [e.event.get(key) if isinstance(e.event, dict) else None for e in self.events]

    def poison(self, predicate: Any, code: int, text: str, *, name_it: bool = True) -> None:
        """Make every envelope whose event matches `predicate` bad with `code` (12, 13, 6, 15): Splunk
        indexes the envelopes before it and names it in `invalid-event-number` (unless `name_it` is off)."""
        self.poisoned.append((predicate, code, text, name_it))

    async def wait_for(self, predicate: Any) -> None:
        """Wait (no polling) until `predicate()` holds; the state changes on every request."""
        while not predicate():
            assert self.changed is not None
            await self.changed.wait()

    def _notify(self) -> None:
        if self.changed is not None:
            self.changed.set()
            self.changed = trio.Event()

    # -- the app --------------------------------------------------------------------------------------

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        record = Received(scope["method"], scope["path"], headers, query, raw)
        status, reply, extra = self._handle(record, raw)
        record.status = status
        record.reply = reply if isinstance(reply, dict) else {"raw": reply}
        if self.record_requests:
            self.requests.append(record)
        body = orjson.dumps(reply) if isinstance(reply, dict) else reply
        ctype = "application/json; charset=UTF-8" if isinstance(reply, dict) else "text/plain"
        await asgi.respond(send, status, body, ctype, extra)
        self._notify()

    def _handle(self, req: Received, raw: bytes) -> tuple[int, dict[str, Any] | bytes, list[tuple[bytes, bytes]]]:
        if req.path == "/fake/stats":
            return 200, {"events": self.event_count, "distinct_ids": len(self.distinct_ids),
                         "first_event_at": self.first_event_at, "last_event_at": self.last_event_at,
                         "event_requests": self.event_requests,
                         "ack_requests": self.ack_requests}, []
        if req.path in HEALTH_PATHS:
            if req.method != "GET":
                return 405, {"text": "Method Not Allowed", "code": 405}, []
            return (200 if self.health == 17 else 503), {"text": _HEALTH_TEXT[self.health], "code": self.health}, []
        if req.path not in EVENT_PATHS and req.path not in ACK_PATHS:
            return 404, {"text": "The requested URL was not found on this server.", "code": 404}, []
        if req.method != "POST":
            return 405, {"text": "Method Not Allowed", "code": 405}, []
        token, failure = self._authenticate(req)
        if failure is not None:
            return failure[0], failure[1], []
        assert token is not None
        channel = req.headers.get("x-splunk-request-channel") or next(iter(req.query.get("channel", [])), None)
        if token.use_ack:
            if not channel:
                return 400, {"text": "Data channel is missing", "code": 10}, []
            if not _GUID.match(channel):
                return 400, {"text": "Invalid data channel", "code": 11}, []
        if req.path in ACK_PATHS:
            return self._ack(token, channel, raw)
        self.event_requests += 1
        if self.faults:
            fault = self.faults.popleft()
            return fault.status, fault.reply, fault.headers
        body, problem = self._decode(req, raw)
        if problem is not None:
            return problem[0], problem[1], []
        req.body = body
        return self._events(token, channel, body)

    def _authenticate(self, req: Received) -> tuple[Token | None, tuple[int, dict[str, Any]] | None]:
        header = req.headers.get("authorization")
        value: str | None = None
        if header is None:
            if "token" in req.query:
                if not self.query_auth:
                    return None, (400, {"text": "Query string authorization is not enabled", "code": 16})
                value = req.query["token"][0]
            else:
                return None, (401, {"text": "Token is required", "code": 2})
        else:
            scheme, _, rest = header.partition(" ")
            if scheme == "Splunk" and rest.strip():
                value = rest.strip()
            elif scheme.lower() == "basic":
                try:
                    _, _, value = base64.b64decode(rest.strip(), validate=True).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    value = None
            if not value:
                return None, (401, {"text": "Invalid authorization", "code": 3})
        token = self.tokens.get(value)
        if token is None:
            return None, (403, {"text": "Invalid token", "code": 4})
        if not token.enabled:
            return None, (403, {"text": "Token disabled", "code": 1})
        return token, None

    def _decode(self, req: Received, raw: bytes) -> tuple[bytes, tuple[int, dict[str, Any]] | None]:
        encoding = req.headers.get("content-encoding", "").strip().lower()
        body = raw
        if encoding == "gzip":
            try:
                body = gzip.decompress(raw) if raw else b""
            except (OSError, EOFError, zlib.error):
                return b"", (400, {"text": "Invalid data format", "code": 6, "invalid-event-number": 0})
        elif encoding not in ("", "identity"):
            return b"", (415, {"text": "Unsupported Media Type", "code": 415})
        if len(body) > self.max_content_length:
            return b"", (413, {"text": f"Content-Length of {len(body)} too large (maximum is "
                                       f"{self.max_content_length})", "code": 413})
        if not body.strip():
            return b"", (400, {"text": "No data", "code": 5})
        return body, None

    def _events(self, token: Token, channel: str | None, body: bytes
                ) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        envelopes = _split(body)
        for number, envelope in enumerate(envelopes):
            error = _check(envelope, token)
            name_it = True
            for predicate, code, text, named_flag in self.poisoned:
                if error is None and isinstance(envelope, dict) and predicate(envelope.get("event")):
                    error, name_it = (code, text), named_flag
            if error is not None:
                code, text = error
                named = number + 1 if code == 7 and self.index_error_off_by_one else number
                reply: dict[str, Any] = {"text": text, "code": code}
                if name_it:
                    reply["invalid-event-number"] = named
                return 400, reply, []
            assert isinstance(envelope, dict)
            self.event_count += 1
            self.last_event_at = time.time()
            self.first_event_at = self.first_event_at or self.last_event_at
            if self.keep_events:
                self.events.append(Indexed(envelope, channel, self.event_requests))
            elif isinstance(envelope["event"], dict) and isinstance(envelope["event"].get("id"), str):
                self.distinct_ids.add(envelope["event"]["id"])
        reply = {"text": "Success", "code": 0}
        if token.use_ack:
            assert channel is not None
            state = self.channels.setdefault(channel, _Channel())
            reply["ackId"] = state.next_id
            state.acks[state.next_id] = self.ack_mode == "immediate"
            state.next_id += 1
        return 200, reply, []

    def _ack(self, token: Token, channel: str | None, raw: bytes
             ) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        self.ack_requests += 1
        if not token.use_ack:
            return 400, {"text": "ACK is disabled", "code": 14}, []
        try:
            wanted = orjson.loads(raw)["acks"]
            ids = [int(i) for i in wanted]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return 400, {"text": "Invalid data format", "code": 6}, []
        state = self.channels.get(channel or "")
        answer: dict[str, bool] = {}
        for ack_id in ids:
            done = state is not None and state.acks.get(ack_id, False) and self.ack_mode != "lost"
            answer[str(ack_id)] = bool(done)
            if done and state is not None:
                del state.acks[ack_id]  # reported true once, then forgotten
        return 200, {"acks": answer}, []


def _split(body: bytes) -> list[Any]:
    """The envelopes of a body: JSON objects back to back, separated by whitespace or nothing.

    A part that is not valid JSON ends the list with a `_Bad` marker (Splunk stops there too)."""
    out: list[Any] = []
    try:
        return [orjson.loads(line) for line in body.split(b"\n") if line.strip()]
    except orjson.JSONDecodeError:
        pass
    text = body.decode("utf-8", "replace")
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            return out
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            out.append(_BAD)
            return out
        out.append(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


_BAD = object()


def _check(envelope: Any, token: Token) -> tuple[int, str] | None:
    if envelope is _BAD or not isinstance(envelope, dict):
        return 6, "Invalid data format"
    if "event" not in envelope:
        return 12, "Event field is required"
    event = envelope["event"]
    if event is None or (isinstance(event, str) and not event.strip()):
        return 13, "Event field cannot be blank"
    when = envelope.get("time")
    if when is not None and not _is_time(when):
        return 6, "Invalid data format"
    for key in ("host", "source", "sourcetype", "index"):
        if key in envelope and not isinstance(envelope[key], str):
            return 6, "Invalid data format"
    fields = envelope.get("fields")
    if fields is not None:
        if not isinstance(fields, dict):
            return 15, "Error in handling indexed fields"
        for value in fields.values():
            items = value if isinstance(value, list) else [value]
            if any(isinstance(item, dict | list) for item in items):
                return 15, "Error in handling indexed fields"
    index = envelope.get("index") or token.default_index
    if token.indexes is not None and index not in token.indexes:
        return 7, "Incorrect index"
    return None


def _is_time(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


async def serve(fake: FakeHec, *, host: str = "127.0.0.1", port: int = 0, cert_file: str | None = None,
                key_file: str | None = None, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `fake` until cancelled; `task_status.started()` gets its base URL."""
    config = asgi.hypercorn_config(f"{host}:{port}", cert_file=cert_file, key_file=key_file)

    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await asgi.serve(fake, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        addresses: list[str] = await nursery.start(run)
        bound = addresses[0].split("://", 1)[-1]
        scheme = "https" if cert_file else "http"
        fake.url = f"{scheme}://{bound}"
        task_status.started(fake.url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Splunk HEC for tests and benchmarks (127.0.0.1 only).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--token", required=True)
    parser.add_argument("--ack", action="store_true", help="the token uses indexer acknowledgement")
    parser.add_argument("--max-content-length", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    async def run() -> None:
        fake = FakeHec([Token(args.token, use_ack=args.ack)], max_content_length=args.max_content_length)
        fake.record_requests = False
        fake.keep_events = False
        async with trio.open_nursery() as nursery:
            url = await nursery.start(functools.partial(serve, fake, port=args.port))
            if args.port_file:
                args.port_file.write_text(url.rsplit(":", 1)[1])
            print(f"fake HEC listening on {url}", file=sys.stderr, flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
