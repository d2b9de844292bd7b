"""HTTP for the `webhook` destination: one request, its answer reduced to what decides a result.

Transport failures (refused connections, timeouts, a certificate not accepted) become results here and
nowhere else. Redirects are followed only when allowed, always with the same method and body. Only a
URL's scheme, host and port ever appear in a message: paths and queries may carry tokens.

Metrics:
    # HELP audit_relay_webhook_requests_total HTTP requests made, by status class (2xx..5xx, or error).
    # TYPE audit_relay_webhook_requests_total counter
    # HELP audit_relay_webhook_request_duration_seconds One HTTP request, from sending to the answer read.
    # TYPE audit_relay_webhook_request_duration_seconds histogram
    # HELP audit_relay_webhook_sent_bytes_total Request body bytes sent (after compression).
    # TYPE audit_relay_webhook_sent_bytes_total counter

Logs: `webhook_redirect_followed` (info), `webhook_redirect_credentials_dropped` (warning: a redirect to
another host is sent without `auth` and `headers`).
"""

from __future__ import annotations

import http
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

import relay
from relay.http_client import AsyncClient, release
from relay.tls import untrusted_certificate

FOLLOWABLE = frozenset({301, 302, 307, 308})
"""Redirects re-sent with the same method and body (never turned into a GET, as browsers do)."""
MAX_REDIRECTS = 5
READ_LIMIT = 64 * 1024
"""Bytes of a response body read at most (for error reasons); the rest is discarded."""
_PHRASES = {413: "Payload Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable",
            422: "Unprocessable Entity"}
"""Names that differ between Python versions' `http.HTTPStatus`; these stay the same everywhere."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer, reduced to what decides the result."""

    status: int
    phrase: str
    headers: httpx.Headers
    body: str
    """Up to READ_LIMIT bytes of the body, decoded, on one line, secrets scrubbed."""

    def describe(self, limit: int) -> str:
        """`HTTP 413 Payload Too Large: <at most limit bytes of the body>`."""
        text = truncate(self.body, limit)
        return f"HTTP {self.status} {self.phrase}" + (f": {text}" if text else "")


class WebhookHttp:
    """An httpx client bound to one URL, with the destination's timeout, redirect rule and metrics."""

    def __init__(self, context: relay.Context, url: str, *, timeout: float, follow_redirects: bool,
                 private_headers: frozenset[str], scrub: Callable[[str], str]) -> None:
        self.url = httpx.URL(url)
        self.timeout = timeout
        self.follow_redirects = follow_redirects
        self.private_headers = private_headers
        """Headers with credentials: not sent on when a redirect leads to another host."""
        self.scrub = scrub
        self.log = context.log
        self._client: httpx.AsyncClient | None = None
        self._m_requests = context.counter(
            "webhook_requests_total", "HTTP requests made, by status class (2xx..5xx, or error).",
            ("status_class",))
        self._m_duration = context.histogram(
            "webhook_request_duration_seconds", "One HTTP request, from sending to the answer read.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self._m_bytes = context.counter("webhook_sent_bytes_total", "Request body bytes sent (after compression).")

    def where(self, method: str) -> str:
        return f"{method} {origin(self.url)}"

    def open(self, tls: ssl.SSLContext) -> None:
        self._client = AsyncClient(verify=tls, timeout=httpx.Timeout(self.timeout), follow_redirects=False)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def exchange(self, method: str, headers: dict[str, str],
                       body: bytes) -> Answer | relay.RetryLater | relay.Halted:
        """The request, following redirects if allowed (same method, same body)."""
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            answer = await self._request(method, url, headers, body)
            if not (isinstance(answer, Answer) and self.follow_redirects
                    and answer.status in FOLLOWABLE and answer.headers.get("location")):
                return answer
            target = url.join(answer.headers["location"])
            if target.scheme not in ("http", "https") or (url.scheme == "https" and target.scheme != "https"):
                return relay.Halted(f"{self.where(method)}: HTTP {answer.status} redirects to {origin(target)}, "
                                    "which is not https; not followed")
            if target.host != url.host and self.private_headers & headers.keys():
                headers = {k: v for k, v in headers.items() if k not in self.private_headers}
                self.log.warning("webhook_redirect_credentials_dropped", to=origin(target),
                                 hint="auth and headers are not sent to another host")
            self.log.info("webhook_redirect_followed", status=answer.status, to=origin(target))
            url = target
        return relay.Halted(f"{self.where(method)}: more than {MAX_REDIRECTS} redirects")

    async def _request(self, method: str, url: httpx.URL, headers: dict[str, str],
                       body: bytes) -> Answer | relay.RetryLater | relay.Halted:
        if self._client is None:
            raise RuntimeError("the webhook destination is not open")
        started = time.perf_counter()
        status_class = "error"
        try:
            with trio.move_on_after(self.timeout) as scope:
                request = self._client.build_request(method, url, headers=headers, content=body)
                response = await self._client.send(request, stream=True)
                try:
                    status_class = f"{response.status_code // 100}xx"
                    raw = await _read_at_most(response, READ_LIMIT)
                finally:
                    await response.aclose()
                    release(response)
            if scope.cancelled_caught:
                return relay.RetryLater(f"{self.where(method)}: no complete answer within {self.timeout:g}s")
        except httpx.TimeoutException:
            return relay.RetryLater(f"{self.where(method)}: no answer within {self.timeout:g}s")
        except httpx.TransportError as exc:
            return self._transport_failure(method, exc)
        finally:
            self._m_requests.labels(status_class).inc()
            self._m_duration.observe(time.perf_counter() - started)
            self._m_bytes.inc(len(body))
        phrase = response.reason_phrase or _standard_phrase(response.status_code)
        return Answer(response.status_code, phrase, response.headers, self.scrub(_one_line(raw)))

    def _transport_failure(self, method: str, exc: httpx.TransportError) -> relay.RetryLater | relay.Halted:
        if (cause := untrusted_certificate(exc)) is not None:
            return relay.Halted(f"{self.where(method)}: the receiver's TLS certificate was not accepted "
                                f"({cause.verify_message}); check url, tls.ca_file or tls.verify")
        detail = self.scrub(str(exc)).replace(str(self.url), origin(self.url))
        return relay.RetryLater(f"{self.where(method)}: {type(exc).__name__}" + (f": {detail}" if detail else ""))


def ssl_context(verify: bool, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
                ) -> ssl.SSLContext:
    """The system's CAs (or `ca_file`), and a client certificate for mutual TLS if given. Blocks: reads files."""
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file is not None:
        context = ssl.create_default_context(cafile=str(ca_file))
    else:
        context = ssl.create_default_context()
        paths = ssl.get_default_verify_paths()
        if paths.cafile is None and paths.capath is None:
            import certifi  # httpx's own dependency: the fallback when the system has no CA store

            context.load_verify_locations(certifi.where())
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


def origin(url: httpx.URL) -> str:
    """scheme://host[:port]: paths and queries may carry tokens (Slack, Zapier), so they are never shown."""
    port = f":{url.port}" if url.port is not None else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}"


def truncate(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes of `text` (and a `…` if cut), never cutting a character in two."""
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore") + "…"


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _one_line(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _standard_phrase(status: int) -> str:
    """For servers that send no reason phrase (HTTP/2, hypercorn, many frameworks)."""
    if status in _PHRASES:
        return _PHRASES[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
