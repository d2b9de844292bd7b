"""Source `http`: the WorkOS-compatible push receiver (a WorkOS "HTTP POST" log stream points here).

A request is answered 200 only after its entries are committed to the journal, so a sender that saw the
200 may forget them; anything else it must send again. Bodies: one entry, an array, an envelope with a
`data`/`events` array, or NDJSON, optionally gzip. Invalid entries in a readable body are quarantined
one by one and the rest accepted; an unreadable body is quarantined whole and answered 400. Nothing from
a request that failed authentication is stored or logged, except the peer's address.

Metrics (label `source`):
    audit_relay_http_requests_total{code}          requests answered, by HTTP status
    audit_relay_http_request_duration_seconds      time from request start to answer
    audit_relay_http_received_bytes_total          body bytes read from authenticated requests
Log events (the repeating ones at most once per 10 s, then with `similar_not_logged`): `http_listening`,
`http_auth_failed` (peer, status), `http_body_rejected` (peer, reason), `http_entries_quarantined`,
`http_unavailable` (503), `http_journal_error`, `http_request_failed` (a bug: logged with traceback),
`http_auth_disabled` (warning at start when `auth: none`), `http_reconfigured` / `http_reconfigure_failed`
(a reload applied in place, or not), plus those of `http_auth`.
"""

from __future__ import annotations

import errno
import math
import ssl
import sys
import time
from pathlib import Path
from typing import Any, Literal

import orjson
import trio
from pydantic import Field, field_validator, model_validator

import relay
from relay import asgi
from relay.settings import split_host_port

from .http_auth import Authenticator, AuthSettings, Denied, load_tokens
from .http_bodies import BodyCollector, BodyError, prepare_body

HEALTH_PATH = "/healthz"
MAX_PROBLEMS = 100
"""At most this many per-entry problems are listed in a 200 answer (the count is always complete)."""
WORKER_MIN_BYTES = 1024 * 1024
"""Bodies from this size up (~1,500 entries) are parsed and validated by a worker process (`parse_workers`).
Measured on 2 cores with 100-entry (65 KB) requests, where client, relay and HEC receiver share the cores:
sending them to a worker gave no more throughput (16.9k against 14.5k entries/s, within the noise) and a
worse p99 at half load (35-103 ms against 26 ms); a large body is worth the round trip."""
_ENCODINGS = {b"": False, b"identity": False, b"gzip": True, b"x-gzip": True}


class TlsSettings(relay.Settings):
    cert_file: Path
    """PEM certificate chain (server certificate first)."""
    key_file: Path
    """PEM private key of the certificate."""


class HttpSettings(relay.Settings):
    listen: relay.HostPort
    """Address to listen on, e.g. `0.0.0.0:8443`; port 0 picks a free port (tests)."""
    path: str = "/v1/entries"
    """The one path entries are POSTed to (`/healthz` is served beside it)."""
    tls: TlsSettings | None = None
    auth: Literal["none"] | AuthSettings
    """Required: bearer tokens, a custom header, and/or a WorkOS signature; `none` must be written out."""
    max_body_size: relay.ByteSize = Field(default=10 * 1024 * 1024, gt=0)
    """Largest body accepted, before and after gzip decompression; larger answers 413."""
    max_entries_per_request: int = Field(default=10_000, gt=0)
    """More entries in one request answer 413 (the sender should split the batch)."""
    read_timeout: relay.Duration = Field(default=30.0, gt=0)
    """Close a connection that sends nothing for this long (slow or stuck clients)."""
    request_timeout: relay.Duration = Field(default=60.0, gt=0)
    """The whole body must arrive within this; else 408 (a client trickling bytes cannot hold a slot)."""
    keep_alive: relay.Duration = Field(default=75.0, gt=0)
    """Idle keep-alive connections are closed after this (longer than a load balancer's idle timeout)."""

    @model_validator(mode="before")
    @classmethod
    def _auth_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("auth") is None:
            raise ValueError("`auth` is required: set auth.bearer_tokens, auth.bearer_tokens_file (or "
                             "auth.generate_token), auth.header + auth.value, or auth.signature_secret; "
                             "write `auth: none` to accept unauthenticated requests")
        return data

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or value == HEALTH_PATH or any(c in value for c in "?# "):
            raise ValueError(f"must be a URL path such as /v1/entries (not {HEALTH_PATH}, no query)")
        return value


class _Throttle:
    """At most one log line per `interval` for a repeating event; the next one says how many were skipped."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = -math.inf
        self._skipped = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._skipped += 1
            return None
        skipped, self._skipped, self._last = self._skipped, 0, now
        return skipped


class HttpSource(relay.Source):
    type_name = "http"
    Settings = HttpSettings
    settings: HttpSettings

    addresses: list[str] = []
    """Where the receiver listens once `run()` has started (`http://127.0.0.1:8080`)."""

    def __init__(self, context: relay.Context, settings: HttpSettings) -> None:
        super().__init__(context, settings)
        self._intake: relay.Intake | None = None
        self._auth: Authenticator | None = None
        self._m_requests = context.counter("http_requests_total", "HTTP requests answered, by status code.",
                                           ("code",))
        self._m_duration = context.histogram(
            "http_request_duration_seconds", "Time from the start of a request to its answer.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self._m_bytes = context.counter("http_received_bytes_total",
                                        "Body bytes read from authenticated requests (as sent, before gzip).")
        self._auth_log = _Throttle()
        self._unavailable_log = _Throttle()
        self._rejected_log = _Throttle()
        self._quarantined_log = _Throttle()

    # -- life cycle ------------------------------------------------------------------------------------

    async def open(self) -> None:
        self._auth = await self._authenticator(generate=False)

    async def _authenticator(self, *, generate: bool) -> Authenticator | None:
        """The configured credentials; None while a token is still to be generated, which only `run()`
        does, so `relay check --connect` (open, check, close) writes nothing."""
        auth = self.settings.auth
        if auth == "none":
            return Authenticator(None)
        token_file = auth.bearer_tokens_file or self.context.state_dir / f"{self.name}.token"
        if auth.generate_token and not generate and not token_file.exists():
            return None
        tokens, generated = await trio.to_thread.run_sync(load_tokens, auth, token_file, self.log)
        if generated is not None and sys.stderr.isatty():
            # Shown once, on the terminal of whoever started the relay; never through the logs.
            print(f"\naudit-relay: generated a bearer token for source {self.name!r}, stored in {token_file} "
                  f"(mode 0600):\n\n    {generated}\n", file=sys.stderr)
        return Authenticator(auth, tokens)

    def _config(self, listen: str) -> Any:
        tls = self.settings.tls
        return asgi.hypercorn_config(
            listen, cert_file=str(tls.cert_file) if tls else None, key_file=str(tls.key_file) if tls else None,
            read_timeout=self.settings.read_timeout, keep_alive=self.settings.keep_alive)

    async def run(self, intake: relay.Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._intake = intake
        if self._auth is None:
            self._auth = await self._authenticator(generate=True)
        assert self._auth is not None
        async with trio.open_nursery() as nursery:
            self.addresses = await nursery.start(asgi.serve, self.app, self._config(self.settings.listen))
            if self.settings.auth == "none":
                self.log.warning("http_auth_disabled", hint="anyone who can reach the listener can add entries")
            self.log.info("http_listening", addresses=self.addresses, path=self.settings.path,
                          auth=self._auth.describe(), tls=self.settings.tls is not None)
            task_status.started()

    async def reconfigure(self, settings: HttpSettings) -> bool:
        """Apply new credentials, path and limits without rebinding (a token rotation drops no request);
        a new listen address, TLS or connection timeouts need a restart."""
        keep = ("listen", "tls", "read_timeout", "keep_alive")
        if any(getattr(settings, name) != getattr(self.settings, name) for name in keep) or self._intake is None:
            return False
        previous = self.settings
        self.settings = settings
        try:
            auth = await self._authenticator(generate=True)
        except (ValueError, OSError) as exc:
            self.settings = previous
            self.log.error("http_reconfigure_failed", error=str(exc), hint="the previous settings stay in force")
            return False
        assert auth is not None
        self._auth = auth
        self.log.info("http_reconfigured", path=settings.path, auth=auth.describe())
        return True

    async def check(self) -> str:
        host, port = split_host_port(self.settings.listen)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            hint = " (is the relay already running?)" if exc.errno == errno.EADDRINUSE else ""
            raise relay.CheckFailed(f"cannot listen on {self.settings.listen}: {exc.strerror}{hint}") from None
        for listener in listeners:
            await listener.aclose()
        if self.settings.tls is not None:
            tls = self.settings.tls
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert_file, tls.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise relay.CheckFailed(f"TLS certificate or key unusable: {exc}") from None
        auth = self._auth.describe() if self._auth else "bearer (a token is generated at first start)"
        return f"can listen on {self.settings.listen}{' with TLS' if self.settings.tls else ''}; auth: {auth}"

    # -- the ASGI application -------------------------------------------------------------------------

    async def app(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        try:
            status = await self._handle(scope, receive, send)
        except Exception as exc:
            # A bug, not a client error: the sender must retry, so the answer is a 500, never a 200.
            self.log.exception("http_request_failed", peer=_peer(scope), error=f"{type(exc).__name__}: {exc}")
            status = 500
            await _json(send, 500, {"error": "internal error; the request was not stored, retry it"})
        self._m_requests.labels(str(status)).inc()
        self._m_duration.observe(time.perf_counter() - started)

    async def _handle(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> int:
        path, method = scope["path"], scope["method"]
        if path == HEALTH_PATH:
            if method not in ("GET", "HEAD"):
                return await _error(send, 405, "use GET or HEAD", [(b"allow", b"GET, HEAD")])
            if self._intake is not None and self._intake.writable:
                return await _json(send, 200, {"status": "ok"})
            return await _json(send, 503, {"status": "unavailable",
                                           "reason": "the journal is full or the relay is stopping"},
                               [(b"retry-after", b"5")])
        if path != self.settings.path:
            return await _error(send, 404, f"not found: entries are POSTed to {self.settings.path}")
        if method != "POST":
            return await _error(send, 405, "entries are sent with POST", [(b"allow", b"POST")])
        headers = _headers(scope)
        assert self._auth is not None and self._intake is not None
        denied = self._auth.check_headers(headers) or self._auth.check_signature_header(headers, time.time())
        if denied is not None:
            return await self._deny(scope, send, denied)
        if not self._intake.writable:
            return await self._unavailable(scope, send, "the journal is full or the relay is stopping", 5.0)

        encoding = headers.get(b"content-encoding", b"").strip().lower()
        if encoding not in _ENCODINGS:
            return await _error(send, 415, "unsupported Content-Encoding: use gzip or none",
                                [(b"accept-encoding", b"gzip")])
        length = headers.get(b"content-length")
        limit = self.settings.max_body_size
        if length is not None and length.isdigit() and int(length) > limit:
            return await _error(send, 413, f"the body ({int(length)} bytes) is larger than max_body_size "
                                           f"({limit} bytes)", [(b"connection", b"close")])
        body = BodyCollector(limit, gzip=_ENCODINGS[encoding])
        try:
            with trio.move_on_after(self.settings.request_timeout) as timeout:
                if not await _read(receive, body):
                    return 499  # the client went away; nothing was stored
        except BodyError as exc:  # larger than max_body_size: nothing kept, whoever sent it
            return await self._reject(scope, send, exc, None)
        if timeout.cancelled_caught:
            return await _error(send, 408, f"the body did not arrive within {self.settings.request_timeout:g}s",
                                [(b"connection", b"close")])
        denied = self._auth.check_signature(headers, body.raw, time.time())
        if denied is not None:
            return await self._deny(scope, send, denied)
        self._m_bytes.inc(body.received)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        try:
            data = body.finish()
            if len(data) >= WORKER_MIN_BYTES:
                prepared = await self.context.workers.run(prepare_body, data, content_type,
                                                          self.settings.max_entries_per_request)
            else:
                prepared = prepare_body(data, content_type, self.settings.max_entries_per_request)
        except BodyError as exc:
            return await self._reject(scope, send, exc, body.raw if exc.status == 400 else None)
        try:
            result = await self._intake.submit_prepared(prepared)
        except relay.JournalUnavailable as exc:
            return await self._unavailable(scope, send, exc.reason, exc.retry_after)
        except relay.JournalError as exc:
            self.log.error("http_journal_error", peer=_peer(scope), error=str(exc))
            return await self._unavailable(scope, send, "the journal could not store the entries", 5.0)
        answer: dict[str, Any] = {"accepted": result.accepted, "duplicates": result.duplicates,
                                  "quarantined": result.quarantined}
        if result.problems:
            answer["problems"] = [{"index": i, "reason": r} for i, r in result.problems[:MAX_PROBLEMS]]
            if len(result.problems) > MAX_PROBLEMS:
                answer["problems_not_listed"] = len(result.problems) - MAX_PROBLEMS
            skipped = self._quarantined_log.allow()
            if skipped is not None:
                self.log.warning("http_entries_quarantined", peer=_peer(scope), quarantined=result.quarantined,
                                 first=result.problems[0][1], **({"similar_not_logged": skipped} if skipped else {}))
        self.log.debug("http_request", peer=_peer(scope), entries=len(prepared), **answer)
        return await _json(send, 200, answer)

    async def _deny(self, scope: asgi.Scope, send: asgi.Send, denied: Denied) -> int:
        skipped = self._auth_log.allow()
        if skipped is not None:
            self.log.warning("http_auth_failed", peer=_peer(scope), status=denied.status, reason=denied.reason,
                             **({"similar_not_logged": skipped} if skipped else {}))
        extra = [(b"www-authenticate", denied.challenge.encode())] if denied.challenge else []
        return await _error(send, denied.status, denied.reason, extra)

    async def _reject(self, scope: asgi.Scope, send: asgi.Send, exc: BodyError, keep: bytes | None) -> int:
        """A body we cannot use: keep it in quarantine when it is unreadable (400), then say why."""
        skipped = self._rejected_log.allow()
        if skipped is not None:
            self.log.warning("http_body_rejected", peer=_peer(scope), status=exc.status, reason=exc.message,
                             **({"similar_not_logged": skipped} if skipped else {}))
        if keep is not None and keep:
            assert self._intake is not None
            try:
                await self._intake.quarantine(keep, f"http body from {_peer(scope)}: {exc.message}")
            except relay.JournalError as error:
                reason = error.reason if isinstance(error, relay.JournalUnavailable) else str(error)
                return await self._unavailable(scope, send, f"could not keep the unreadable body: {reason}", 5.0)
        extra = [(b"connection", b"close")] if exc.status == 413 else []
        return await _error(send, exc.status, exc.message, extra)

    async def _unavailable(self, scope: asgi.Scope, send: asgi.Send, reason: str, retry_after: float) -> int:
        skipped = self._unavailable_log.allow()
        if skipped is not None:
            self.log.warning("http_unavailable", peer=_peer(scope), reason=reason,
                             **({"similar_not_logged": skipped} if skipped else {}))
        return await _error(send, 503, f"{reason}; retry later",
                            [(b"retry-after", str(max(1, math.ceil(retry_after))).encode())])


async def _read(receive: asgi.Receive, body: BodyCollector) -> bool:
    """Feed the request body into `body`; False if the client disconnected first."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        body.feed(message.get("body", b""))
        if not message.get("more_body", False):
            return True


def _headers(scope: asgi.Scope) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        name = bytes(name).lower()
        headers[name] = headers[name] + b", " + bytes(value) if name in headers else bytes(value)
    return headers


def _peer(scope: asgi.Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def _json(send: asgi.Send, status: int, value: Any, headers: list[tuple[bytes, bytes]] | None = None) -> int:
    await asgi.respond(send, status, orjson.dumps(value) + b"\n", "application/json", headers)
    return status


async def _error(send: asgi.Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> int:
    return await _json(send, status, {"error": message, "status": status}, headers)


@relay.hookimpl
def register_source_types(register):  # type: ignore[no-untyped-def]
    register(HttpSource)
