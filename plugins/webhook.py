"""Destination `webhook`: signed, idempotent HTTP delivery of audit entries (Standard Webhooks).

Every request carries `webhook-id` (also sent as `Idempotency-Key`), `webhook-timestamp` and, with
`signing_secrets`, `webhook-signature` as the Standard Webhooks specification describes them. The id is a
hash of the destination's name, the (sub-)batch's journal boundaries and the exact entries sent, so a
retry, before or after a restart, carries the same id and a receiver can drop what it already processed.

A 400, 413 or 422 answer makes the relay split the batch in halves until the refused entries stand alone;
those go to the dead-letter store with the status and the receiver's words, the rest are delivered.

Metrics:
    # HELP audit_relay_webhook_requests_total HTTP requests made, by status class (2xx..5xx, or error).
    # TYPE audit_relay_webhook_requests_total counter
    # HELP audit_relay_webhook_request_duration_seconds One HTTP request, from sending to the answer read.
    # TYPE audit_relay_webhook_request_duration_seconds histogram
    # HELP audit_relay_webhook_sent_bytes_total Request body bytes sent (after compression).
    # TYPE audit_relay_webhook_sent_bytes_total counter

Logs: `webhook_batch_split` (warning: a 400/413/422 answer, the batch is split to find the refused
entries), `webhook_redirect_followed` (info), `webhook_redirect_credentials_dropped` (warning: a redirect
to another host, sent without `auth` and `headers`).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import hmac
import http
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import trio
from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

import relay
from relay.retry import parse_retry_after

RETRY_STATUSES = frozenset({408, 409, 425, 429})
"""Plus every 5xx: the receiver is busy, throttling or broken for now; the same request is sent again."""
HALT_STATUSES = frozenset({401, 403, 404, 405, 410})
"""Credentials or address are wrong: nothing moves until someone fixes them (retried every max_backoff)."""
SPLIT_STATUSES = frozenset({400, 413, 422})
"""The receiver refused the content: split the batch until the refused entries are found."""
FOLLOWABLE = frozenset({301, 302, 307, 308})
"""Redirects that are re-sent with the same method and body (never turned into a GET)."""
MAX_REDIRECTS = 5
READ_LIMIT = 64 * 1024
"""Bytes of a response body read at most (for error reasons); the rest is discarded."""
REASON_BYTES = 1024
"""Bytes of the receiver's body kept in a dead letter's reason."""
CHECKPOINT = 1.0
"""Seconds after which a send that takes many requests (encoding `json`, a split) reports its progress, so
a slow receiver can never make a batch outlast `send_timeout` and start over forever."""
COMPRESS_IN_THREAD = 64 * 1024

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_RELAY_HEADERS = frozenset({
    "content-length", "content-encoding", "transfer-encoding", "host", "connection",
    "webhook-id", "webhook-timestamp", "webhook-signature", "idempotency-key",
})
_CONTENT_TYPES = {"json": "application/json", "json_array": "application/json", "ndjson": "application/x-ndjson"}


# -- settings --------------------------------------------------------------------------------------------

def _signing_key(secret: relay.Secret) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (Standard Webhooks: 24 to 64 random bytes)."""
    value = secret.reveal()
    if not value.startswith("whsec_"):
        raise ValueError("a signing secret is written whsec_<base64 of 24 to 64 random bytes>")
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after whsec_ is not valid base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a signing secret must decode to 24 to 64 bytes (this one has {len(key)})")
    return key


def _checked_signing_secret(secret: relay.Secret) -> relay.Secret:
    _signing_key(secret)
    return secret


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


SigningSecret = Annotated[relay.Secret, AfterValidator(_checked_signing_secret)]


class BasicAuth(relay.Settings):
    username: str = Field(min_length=1)
    password: relay.Secret


class AuthSettings(relay.Settings):
    bearer_token: relay.Secret | None = None
    """Sent as `Authorization: Bearer <token>`."""
    basic: BasicAuth | None = None
    """Sent as `Authorization: Basic base64(username:password)`."""

    @model_validator(mode="after")
    def _exactly_one(self) -> AuthSettings:
        if (self.bearer_token is None) == (self.basic is None):
            raise ValueError("set exactly one of auth.bearer_token or auth.basic")
        return self


class TlsSettings(relay.Settings):
    verify: bool = True
    """Check the receiver's certificate and host name (against the system's CAs, or `ca_file`)."""
    ca_file: Path | None = None
    """PEM bundle of the CAs to trust instead of the system's (a private CA)."""
    cert_file: Path | None = None
    """PEM client certificate, for receivers that require mutual TLS."""
    key_file: Path | None = None
    """PEM private key of `cert_file` (if not in `cert_file` itself)."""

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if self.ca_file is not None and not self.verify:
            raise ValueError("tls.ca_file has no effect with tls.verify: false")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file needs tls.cert_file")
        return self


class WebhookSettings(relay.Settings):
    url: str
    """Where entries are sent (http:// or https://). Only its scheme, host and port ever appear in logs."""
    method: Annotated[Literal["POST", "PUT"], BeforeValidator(_upper)] = "POST"
    headers: dict[str, relay.Secret] = {}
    """Extra request headers. Every value is treated as a secret: masked, and never written to a log."""
    auth: AuthSettings | None = None
    encoding: Literal["json", "json_array", "ndjson"] = "json_array"
    """`json`: one entry per request; `json_array`: a batch as one JSON array; `ndjson`: one entry per line."""
    compression: Literal["gzip", "none"] = "none"
    tls: TlsSettings = TlsSettings()
    timeout: relay.Duration = Field(default=30.0, gt=0)
    """One request, from connecting to the last byte of the answer; keep it below `send_timeout`."""
    follow_redirects: bool = False
    """Follow 301/302/307/308 with the same method and body; otherwise a redirect halts the destination."""
    signing_secrets: list[SigningSecret] = []
    """`whsec_<base64>` secrets; each adds a `v1,<signature>` to `webhook-signature` (several for rotation)."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError):
            raise ValueError("not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        if url.userinfo:
            raise ValueError("put credentials under auth.basic, not in the URL (URLs end up in logs)")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, relay.Secret]) -> dict[str, relay.Secret]:
        for name, header in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name[:60]!r} is not a valid HTTP header name")
            if name.lower() in _RELAY_HEADERS:
                raise ValueError(f"header {name!r} is set by the relay itself")
            if any(ch in header.reveal() for ch in "\r\n\0"):
                raise ValueError(f"the value of header {name!r} contains a line break or NUL")
        return value

    @model_validator(mode="after")
    def _one_authorization(self) -> WebhookSettings:
        if self.auth is not None and any(name.lower() == "authorization" for name in self.headers):
            raise ValueError("set the Authorization header either under headers or with auth, not both")
        return self


# -- the destination --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Answer:
    """An HTTP answer, reduced to what decides the result."""

    status: int
    phrase: str
    headers: httpx.Headers
    body: str
    """Up to READ_LIMIT bytes of the body, decoded, secrets scrubbed."""

    def describe(self, limit: int | None = None) -> str:
        text = self.body if limit is None else _truncate(self.body, limit)
        return f"HTTP {self.status} {self.phrase}" + (f": {text}" if text else "")


@dataclass(frozen=True, slots=True)
class _Refused:
    """400/413/422: the receiver would not take these entries."""

    reason: str


class WebhookDestination(relay.Destination):
    type_name = "webhook"
    Settings = WebhookSettings
    settings: WebhookSettings

    def __init__(self, context: relay.Context, settings: WebhookSettings) -> None:
        super().__init__(context, settings)
        self._url = httpx.URL(settings.url)
        self._where = f"{settings.method} {_origin(self._url)}"
        self._keys = [_signing_key(secret) for secret in settings.signing_secrets]
        self._base_headers, self._private_headers = self._static_headers()
        self._secrets = self._secret_texts()
        self._client: httpx.AsyncClient | None = None
        self._deferred: dict[int, tuple[relay.RetryLater | relay.Halted, float]] = {}
        self._m_requests = context.counter(
            "webhook_requests_total", "HTTP requests made, by status class (2xx..5xx, or error).",
            ("status_class",))
        self._m_duration = context.histogram(
            "webhook_request_duration_seconds", "One HTTP request, from sending to the answer read.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self._m_bytes = context.counter("webhook_sent_bytes_total", "Request body bytes sent (after compression).")

    def _static_headers(self) -> tuple[dict[str, str], frozenset[str]]:
        """Headers sent with every request, and the names of those that carry credentials."""
        s = self.settings
        headers = {"user-agent": f"audit-relay/{relay.__version__}",
                   "content-type": _CONTENT_TYPES[s.encoding]}
        headers.update({name.lower(): value.reveal() for name, value in s.headers.items()})
        if s.compression == "gzip":
            headers["content-encoding"] = "gzip"
        if s.auth is not None and s.auth.bearer_token is not None:
            headers["authorization"] = f"Bearer {s.auth.bearer_token.reveal()}"
        elif s.auth is not None and s.auth.basic is not None:
            headers["authorization"] = f"Basic {_basic_credential(s.auth.basic)}"
        private = frozenset({"authorization", *(name.lower() for name in s.headers)})
        return headers, private

    def _secret_texts(self) -> list[str]:
        """Every form in which a credential of ours could come back in a receiver's answer."""
        s = self.settings
        texts = [value.reveal() for value in s.headers.values()]
        for secret in s.signing_secrets:
            texts += [secret.reveal(), secret.reveal().removeprefix("whsec_")]
        if s.auth is not None and s.auth.bearer_token is not None:
            texts.append(s.auth.bearer_token.reveal())
        if s.auth is not None and s.auth.basic is not None:
            texts += [s.auth.basic.password.reveal(), _basic_credential(s.auth.basic)]
        return sorted({t for t in texts if len(t) >= 4}, key=len, reverse=True)

    async def open(self) -> None:
        context = await trio.to_thread.run_sync(_ssl_context, self.settings.tls)
        timeout = self.settings.timeout
        self._client = httpx.AsyncClient(verify=context, timeout=httpx.Timeout(timeout), follow_redirects=False)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # -- sending ------------------------------------------------------------------------------------------

    async def send(self, batch: relay.Batch) -> relay.Result:
        if not batch.entries:
            return relay.Delivered()
        deferred = self._take_deferred(batch.entries[0].seq)
        if deferred is not None:
            return deferred
        if self.settings.encoding == "json":
            pending = [(i, i + 1) for i in reversed(range(len(batch)))]
        else:
            pending = [(0, len(batch))]
        reasons: dict[int, str] = {}
        split = False
        started = trio.current_time()
        # Ranges are taken in order, so when one starts every entry before it is settled.
        while pending:
            start, stop = pending.pop()
            if start > 0 and trio.current_time() - started >= CHECKPOINT:
                return relay.Rejected(reasons, resend_from=start)
            outcome = await self._post(batch.slice(start, stop))
            if outcome is None:
                continue
            if isinstance(outcome, _Refused):
                if stop - start == 1:
                    reasons[start] = outcome.reason
                else:
                    middle = (start + stop) // 2
                    pending += [(middle, stop), (start, middle)]
                    if not split:
                        split = True
                        self.log.warning("webhook_batch_split", batch=batch.id, entries=len(batch),
                                         reason=_truncate(outcome.reason, 200))
                continue
            if start == 0:
                return outcome
            # Keep what is settled; the rest comes back as a new batch, which first gets this outcome.
            self._deferred[batch.entries[start].seq] = (outcome, trio.current_time())
            return relay.Rejected(reasons, resend_from=start)
        return relay.Rejected(reasons) if reasons else relay.Delivered()

    def _take_deferred(self, first_seq: int) -> relay.Result | None:
        """The outcome a partial send ended on, handed to the re-sent rest once, so it backs off first."""
        found = self._deferred.pop(first_seq, None)
        if found is None:
            return None
        outcome, at = found
        if isinstance(outcome, relay.RetryLater) and outcome.after is not None:
            left = outcome.after - (trio.current_time() - at)
            return relay.RetryLater(outcome.reason, max(0.0, left)) if left > 0 else None
        return outcome

    async def _post(self, part: relay.Batch) -> _Refused | relay.RetryLater | relay.Halted | None:
        """One request for `part`: None if accepted, else why not."""
        body = self._encode(part)
        message_id = self._message_id(part, body)
        if self.settings.compression == "gzip":
            body = await _gzip(body)
        answer = await self._exchange(self.settings.method, self._signed_headers(message_id, body), body)
        if not isinstance(answer, _Answer):
            return answer
        status = answer.status
        if 200 <= status < 300:
            return None
        if status in SPLIT_STATUSES:
            return _Refused(answer.describe(REASON_BYTES))
        if status in RETRY_STATUSES or status >= 500:
            return relay.RetryLater(f"{self._where}: {answer.describe(200)}",
                                    parse_retry_after(answer.headers.get("retry-after")))
        if 300 <= status < 400:
            to = answer.headers.get("location")
            target = f" to {_origin(self._url.join(to))}" if to else ""
            hint = "redirects are not followed" if not self.settings.follow_redirects else "not followed"
            return relay.Halted(f"{self._where}: HTTP {status} {answer.phrase}{target}; {hint} "
                                "(check url, or set follow_redirects: true)")
        return relay.Halted(f"{self._where}: {answer.describe(200)}")

    def _encode(self, part: relay.Batch) -> bytes:
        datas = [entry.data for entry in part.entries]
        if self.settings.encoding == "ndjson":
            return b"\n".join(datas) + b"\n"
        if self.settings.encoding == "json_array":
            return b"[" + b",".join(datas) + b"]"
        return datas[0]

    def _message_id(self, part: relay.Batch, body: bytes) -> str:
        """Same destination, same journal boundaries, same entries: same id, on every attempt and restart.

        Hashing the entries too means a changed filter or `drop_fields` between a crash and the re-send
        gives a new id, so a receiver never drops content it has not seen as a duplicate.
        """
        digest = hashlib.sha256(f"{self.name}\0{part.id}\0".encode())
        digest.update(body)
        return f"msg_{digest.hexdigest()[:32]}"

    def _signed_headers(self, message_id: str, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        headers = dict(self._base_headers)
        headers.update({"webhook-id": message_id, "webhook-timestamp": timestamp, "idempotency-key": message_id})
        if self._keys:
            prefix = f"{message_id}.{timestamp}.".encode()
            signatures = []
            for key in self._keys:
                mac = hmac.new(key, prefix, hashlib.sha256)
                mac.update(body)
                signatures.append("v1," + base64.b64encode(mac.digest()).decode("ascii"))
            headers["webhook-signature"] = " ".join(signatures)
        return headers

    # -- HTTP ---------------------------------------------------------------------------------------------

    async def _exchange(self, method: str, headers: dict[str, str],
                        body: bytes) -> _Answer | relay.RetryLater | relay.Halted:
        """The request, following redirects if allowed (same method, same body)."""
        url = self._url
        for _ in range(MAX_REDIRECTS + 1):
            answer = await self._request(method, url, headers, body)
            if not (isinstance(answer, _Answer) and self.settings.follow_redirects
                    and answer.status in FOLLOWABLE and answer.headers.get("location")):
                return answer
            target = url.join(answer.headers["location"])
            if target.scheme not in ("http", "https") or (url.scheme == "https" and target.scheme != "https"):
                return relay.Halted(f"{self._where}: HTTP {answer.status} redirects to {_origin(target)}, "
                                    "which is not https; not followed")
            if target.host != url.host and self._private_headers & headers.keys():
                headers = {k: v for k, v in headers.items() if k not in self._private_headers}
                self.log.warning("webhook_redirect_credentials_dropped", to=_origin(target),
                                 hint="auth and headers are not sent to another host")
            self.log.info("webhook_redirect_followed", status=answer.status, to=_origin(target))
            url = target
        return relay.Halted(f"{self._where}: more than {MAX_REDIRECTS} redirects")

    async def _request(self, method: str, url: httpx.URL, headers: dict[str, str],
                       body: bytes) -> _Answer | relay.RetryLater | relay.Halted:
        """One HTTP request; transport failures become results here and nowhere else."""
        if self._client is None:
            raise RuntimeError("the webhook destination is not open")
        started = time.perf_counter()
        status_class = "error"
        try:
            with trio.move_on_after(self.settings.timeout) as scope:
                request = self._client.build_request(method, url, headers=headers, content=body)
                response = await self._client.send(request, stream=True)
                try:
                    status_class = f"{response.status_code // 100}xx"
                    raw = await _read_at_most(response, READ_LIMIT)
                finally:
                    await response.aclose()
            if scope.cancelled_caught:
                return relay.RetryLater(f"{self._where}: no complete answer within {self.settings.timeout:g}s")
        except httpx.TimeoutException:
            return relay.RetryLater(f"{self._where}: no answer within {self.settings.timeout:g}s")
        except httpx.TransportError as exc:
            return self._transport_failure(exc)
        finally:
            self._m_requests.labels(status_class).inc()
            self._m_duration.observe(time.perf_counter() - started)
            self._m_bytes.inc(len(body))
        phrase = response.reason_phrase or _standard_phrase(response.status_code)
        return _Answer(response.status_code, phrase, response.headers, self._scrub(_printable(raw)))

    def _transport_failure(self, exc: httpx.TransportError) -> relay.RetryLater | relay.Halted:
        detail = self._scrub(str(exc) or type(exc).__name__).replace(str(self._url), _origin(self._url))
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ssl.SSLCertVerificationError):
                return relay.Halted(f"{self._where}: the receiver's TLS certificate was not accepted "
                                    f"({cause.verify_message}); check url, tls.ca_file or tls.verify")
            cause = cause.__cause__ or cause.__context__
        return relay.RetryLater(f"{self._where}: {type(exc).__name__}: {detail}")

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, relay.Secret.MASK)
        return text

    # -- check --------------------------------------------------------------------------------------------

    async def check(self) -> str:
        """OPTIONS (HEAD if OPTIONS is not allowed): reachable, TLS accepted, credentials not refused."""
        headers = self._signed_headers(f"msg_check_{int(time.time())}", b"")
        headers.pop("content-encoding", None)
        method = "OPTIONS"
        answer = await self._exchange(method, headers, b"")
        if isinstance(answer, _Answer) and answer.status in (405, 501):
            method = "HEAD"
            answer = await self._exchange(method, headers, b"")
        where = f"{method} {_origin(self._url)}"
        if not isinstance(answer, _Answer):
            raise relay.CheckFailed(answer.reason.replace(self._where, where))
        status = answer.status
        if status in (401, 403):
            raise relay.CheckFailed(f"{where}: credentials refused: {answer.describe(200)}")
        if status in (404, 410) or status >= 500:
            raise relay.CheckFailed(f"{where}: {answer.describe(200)}")
        if 300 <= status < 400:
            raise relay.CheckFailed(f"{where}: HTTP {status} {answer.phrase}; redirects are not followed "
                                    "(check url, or set follow_redirects: true)")
        return f"{where}: HTTP {status} {answer.phrase}"


# -- helpers ----------------------------------------------------------------------------------------------

def _origin(url: httpx.URL) -> str:
    """scheme://host[:port]: paths and queries may carry tokens (Slack, Zapier), so they are never shown."""
    port = f":{url.port}" if url.port is not None else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}"


def _basic_credential(basic: BasicAuth) -> str:
    return base64.b64encode(f"{basic.username}:{basic.password.reveal()}".encode()).decode("ascii")


def _ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    if not tls.verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca_file is not None:
        context = ssl.create_default_context(cafile=str(tls.ca_file))
    else:
        context = ssl.create_default_context()
        paths = ssl.get_default_verify_paths()
        if paths.cafile is None and paths.capath is None:
            import certifi  # httpx's own dependency: the fallback when the system has no CA store

            context.load_verify_locations(certifi.where())
    if tls.cert_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return context


async def _gzip(body: bytes) -> bytes:
    """gzip with a fixed mtime, so the same entries always compress to the same bytes."""
    if len(body) < COMPRESS_IN_THREAD:
        return gzip.compress(body, compresslevel=6, mtime=0)
    return await trio.to_thread.run_sync(lambda: gzip.compress(body, compresslevel=6, mtime=0))


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _printable(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _truncate(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes of `text`, never cutting a character in two."""
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore") + "…"


_PHRASES = {413: "Payload Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable",
            422: "Unprocessable Entity"}
"""Names that differ between Python versions' `http.HTTPStatus`; these stay the same everywhere."""


def _standard_phrase(status: int) -> str:
    """For servers that send no reason phrase (HTTP/2, hypercorn, many frameworks)."""
    if status in _PHRASES:
        return _PHRASES[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


@relay.hookimpl
def register_destination_types(register: Any) -> None:
    register(WebhookDestination)
