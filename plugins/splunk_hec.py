"""Destination `splunk_hec`: Splunk HTTP Event Collector, with optional indexer acknowledgement.

Each entry becomes one envelope on `/services/collector/event` (`event` = the entry, `time` = its
`occurred_at`); a batch is one request of concatenated envelopes, gzip-compressed by default. Replies are
judged by HEC code (`relay_plugins.hec_protocol`): retry, halt, or, for a bad envelope N, entries before N
delivered, N dead-lettered and the rest sent again. With `ack: true` a batch counts as delivered only once
Splunk confirms it was indexed (`relay_plugins.hec_acks`). The token is only ever sent in the
Authorization header and never appears in a reason or a log line.

Metrics (besides the delivery loop's `audit_relay_destination_*`):
    audit_relay_splunk_hec_requests_total{destination,endpoint,code}  HEC replies by code (`http_<status>`
                                             without one, `network`/`timeout` without a reply)
    audit_relay_splunk_hec_request_duration_seconds{destination,endpoint}
    audit_relay_splunk_hec_request_bytes{destination}                 request body bytes as sent
    audit_relay_splunk_hec_pending_acks{destination}                  ack ids awaiting confirmation
    audit_relay_splunk_hec_ack_wait_seconds{destination}              request to confirmed indexing
Log events: `hec_channel_created`, `hec_plaintext_token` (warning: http:// to a non-local host),
`hec_ack_not_enabled` (warning: `ack: true` but Splunk returned no ackId), `hec_ack_ids_ignored` (warning:
the token has acknowledgement on but `ack: false`), `hec_request_limit_lowered` (warning: HTTP 413),
`hec_isolating_entries` (warning: a bad envelope Splunk did not name), and those of `hec_acks`.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
import uuid
import zlib
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson
import trio
from pydantic import Field, FilePath, field_validator, model_validator

import relay
from relay.http_client import AsyncClient
from relay.tls import untrusted_certificate

from .hec_acks import AckTracker, PollAnswer
from .hec_protocol import EnvelopeEncoder, Reply, judge, read_acks, read_reply

EVENT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
HEALTH_PATH = "/services/collector/health"
CHANNEL_HEADER = "X-Splunk-Request-Channel"
GZIP_LEVEL = 1
"""Fastest level: on JSON it gets most of level 6's ratio at a third of the CPU."""
THREAD_COMPRESS_BYTES = 64 * 1024
"""Bodies larger than this are compressed in a worker thread (zlib releases the GIL) off the event loop."""
ACK_CONCURRENCY = 32
"""Default batches in flight with `ack: true`: each holds its slot until the next poll confirms it (up to
`ack_poll_interval`), so with 1 slot throughput would be one batch per poll interval."""


class TlsSettings(relay.Settings):
    verify: bool = True
    """Check Splunk's certificate and host name. Turn off only for a test instance."""
    ca_file: FilePath | None = None
    """PEM bundle of the CA that signed Splunk's certificate (default: the system's trusted CAs)."""


class SplunkHecSettings(relay.Settings):
    url: str
    """Base address of HEC, e.g. https://splunk.example.com:8088 (a path prefix for a proxy is kept)."""
    token: relay.Secret
    index: str | None = None
    """Index for every entry (default: the token's default index)."""
    source: str | None = None
    """HEC `source` (default: Splunk's, `http:<token name>`)."""
    sourcetype: str = "incidentio:audit"
    host: str = Field(default_factory=socket.gethostname)
    """HEC `host` (default: this machine's host name)."""
    indexed_fields: list[str] = ["action", "actor.type"]
    """Entry fields (dotted paths) sent as HEC indexed `fields`, for fast `field::value` searches."""
    compression: Literal["gzip", "none"] = "gzip"
    tls: TlsSettings = TlsSettings()
    timeout: relay.Duration = Field(default=30.0, gt=0)
    """Time for one HTTP request to Splunk (connect, send, answer)."""
    max_request_bytes: relay.ByteSize = Field(default=900_000, ge=16 * 1024)
    """Largest request body (before compression); a larger batch goes in several requests."""
    ack: bool = False
    """Indexer acknowledgement: count a batch delivered only once Splunk confirms it is indexed."""
    ack_poll_interval: relay.Duration = Field(default=10.0, gt=0)
    ack_timeout: relay.Duration = Field(default=300.0, gt=0)
    """A batch not confirmed within this time is sent again."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// address, e.g. https://splunk.example.com:8088")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment (the token goes in `token`)")
        if "/services/collector" in parts.path:
            raise ValueError("give the base address without /services/collector/..., "
                             "e.g. https://splunk.example.com:8088")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value.strip().rstrip("/")

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: relay.Secret) -> relay.Secret:
        if any(c.isspace() or not c.isprintable() for c in value.reveal()):
            raise ValueError("must not contain spaces, line breaks or control characters (is the file or "
                             "variable it comes from quoted or padded?)")
        return value

    @field_validator("indexed_fields")
    @classmethod
    def _check_fields(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or any(not part for part in name.split(".")):
                raise ValueError(f"{name!r} is not a dotted field path such as actor.type")
        return value

    @model_validator(mode="after")
    def _check_ack(self) -> SplunkHecSettings:
        if self.ack and self.ack_timeout <= self.ack_poll_interval:
            raise ValueError("ack_timeout must be longer than ack_poll_interval")
        return self


class SplunkHecDestination(relay.Destination):
    type_name = "splunk_hec"
    Settings = SplunkHecSettings
    # Splunk Cloud refuses requests over 1 MB. max_bytes counts entry bytes only; the envelope adds
    # ~120-250 bytes per entry (time, host, sourcetype, fields): 700 kB of ~650-byte audit entries (about
    # 1,000 of them) come to ~800-900 kB. max_request_bytes (900 kB) is the hard cap on the real body: a
    # batch above it goes in two requests. 1,000 rather than 500 entries per batch: half the requests and
    # journal records per entry, measured +10% end to end (bench_peer.py --max-entries).
    batch_defaults = relay.BatchDefaults(max_entries=1000, max_bytes=700_000, max_wait=1.0)
    concurrency_default = 4
    settings: SplunkHecSettings

    _client: httpx.AsyncClient | None = None
    transport: httpx.AsyncBaseTransport | None = None
    """Tests put an `httpx.MockTransport` here; None is the network."""

    @classmethod
    def default_concurrency(cls, settings: Any) -> int:
        return ACK_CONCURRENCY if getattr(settings, "ack", False) else cls.concurrency_default

    def attempt_timeout(self, send_timeout: float) -> float:
        return send_timeout + (self.settings.ack_timeout if self.settings.ack else 0.0)

    def __init__(self, context: relay.Context, settings: SplunkHecSettings) -> None:
        super().__init__(context, settings)
        s = settings
        self._token = s.token.reveal()
        self._encoder = EnvelopeEncoder(host=s.host, source=s.source, sourcetype=s.sourcetype, index=s.index,
                                        indexed_fields=s.indexed_fields)
        self._request_cap = s.max_request_bytes
        self._isolate: set[int] = set()
        self._channel = ""
        self._acks: AckTracker | None = None
        self._warned: set[str] = set()
        self._m_requests = context.counter("splunk_hec_requests_total", "Splunk HEC replies by HEC code.",
                                           ("endpoint", "code"))
        self._m_duration = context.histogram("splunk_hec_request_duration_seconds",
                                             "Duration of one request to Splunk HEC.", ("endpoint",))
        self._m_bytes = context.histogram("splunk_hec_request_bytes", "Request body bytes sent to Splunk HEC.",
                                          buckets=(1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 7.5e5, 1e6, 2e6, 5e6))
        self._m_pending = context.gauge("splunk_hec_pending_acks", "Ack ids waiting for Splunk's confirmation.")
        self._m_ack_wait = context.histogram("splunk_hec_ack_wait_seconds",
                                             "Time from a request's answer to Splunk confirming it was indexed.",
                                             buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300))

    # -- life cycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        s = self.settings
        verify: ssl.SSLContext | bool = False
        if s.tls.verify:
            verify = ssl.create_default_context(cafile=str(s.tls.ca_file) if s.tls.ca_file else None)
        host = urlsplit(s.url).hostname or ""
        if s.url.startswith("http://") and not _is_local(host):
            self.log.warning("hec_plaintext_token", host=host,
                             hint="the token crosses the network unencrypted; use https://")
        self._client = AsyncClient(
            base_url=s.url, verify=verify, timeout=httpx.Timeout(s.timeout), follow_redirects=False,
            headers={"Authorization": f"Splunk {self._token}", "User-Agent": f"audit-relay/{relay.__version__}"},
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64), transport=self.transport)
        self._channel = await self.context.state.load("channel") or ""
        if not self._channel:
            self._channel = str(uuid.uuid4())
            await self.context.state.save("channel", self._channel)
            self.log.info("hec_channel_created", channel=self._channel)
        if s.ack:
            self._acks = AckTracker(self._poll_acks, interval=s.ack_poll_interval, timeout=s.ack_timeout,
                                    log=self.log, pending_gauge=self._m_pending, wait_histogram=self._m_ack_wait)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # -- sending ------------------------------------------------------------------------------------------

    async def send(self, batch: relay.Batch) -> relay.Result:
        if len(batch) == 1:
            self._isolate.discard(batch.last_seq)  # a one-entry batch needs no isolating (and ends it)
        body, count = self._body(batch)
        reply = await self._post_events(body)
        if not isinstance(reply, Reply):
            return reply
        verdict = judge(reply, count, index=self.settings.index)
        if verdict.kind == "retry":
            return relay.RetryLater(verdict.reason, reply.retry_after)
        if verdict.kind == "halt":
            return relay.Halted(verdict.reason)
        if verdict.kind == "too_large":
            return self._too_large(verdict.reason, count, len(body), len(batch))
        if verdict.kind == "entry":
            if verdict.index is not None:
                return relay.Rejected({verdict.index: verdict.reason}, resend_from=verdict.index + 1)
            if count == 1:
                return _first_refused(verdict.reason, len(batch))
            self._isolate.add(batch.last_seq)
            self.log.warning("hec_isolating_entries", batch=batch.id, reason=verdict.reason,
                             hint="sending the rest of this batch one entry per request to find the bad one")
            return relay.RetryLater(verdict.reason)
        confirmed = await self._confirm(reply)
        if not isinstance(confirmed, relay.Delivered):
            return confirmed
        if count < len(batch):
            return relay.Rejected({}, resend_from=count)
        self._isolate.discard(batch.last_seq)
        return relay.Delivered()

    def _body(self, batch: relay.Batch) -> tuple[bytes, int]:
        """The request body (envelopes, newline-separated) and how many leading entries it holds: all that
        fit in the request cap, at least one. Built as one join, not an envelope object per entry."""
        if not batch.entries:
            return b"", 0
        head = self._encoder.head
        cap = 1 if batch.last_seq in self._isolate else None
        parts: list[bytes] = []
        size = -1
        for count, entry in enumerate(batch.entries):
            first = head(entry.data, entry.occurred_at, entry.action, entry.actor_type)
            size += len(first) + len(entry.data) + 2
            if count > 0 and (size > self._request_cap or count == cap):
                parts[-1] = b"}"
                return b"".join(parts), count
            parts += (first, entry.data, b"}\n")
        parts[-1] = b"}"
        return b"".join(parts), len(batch.entries)

    def _too_large(self, reason: str, count: int, size: int, total: int) -> relay.Result:
        if count == 1:
            return _first_refused(f"{reason} (one entry, {size} bytes)", total)
        self._request_cap = max(1024, min(self._request_cap, size // 2))
        self.log.warning("hec_request_limit_lowered", refused_bytes=size, now=self._request_cap,
                         hint="Splunk's max_content_length is lower than max_request_bytes; lower it")
        return relay.RetryLater(f"{reason} ({size} bytes); sending at most {self._request_cap} bytes per request")

    async def _post_events(self, body: bytes) -> Reply | relay.RetryLater | relay.Halted:
        headers = {"Content-Type": "application/json", CHANNEL_HEADER: self._channel}
        content = body
        if self.settings.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
            content = (await trio.to_thread.run_sync(_gzip, body) if len(body) > THREAD_COMPRESS_BYTES
                       else _gzip(body))
        self._m_bytes.observe(len(content))
        return await self._request("event", "POST", EVENT_PATH, content=content, headers=headers)

    async def _request(self, endpoint: str, method: str, path: str, **kwargs: Any
                       ) -> Reply | relay.RetryLater | relay.Halted:
        """One HTTP exchange, bounded by `timeout` in total; transport errors become results here, once."""
        assert self._client is not None, "open() was not called"
        started = time.perf_counter()
        label = "network"
        try:
            with trio.fail_after(self.settings.timeout):
                response = await self._client.request(method, path, **kwargs)
            reply = read_reply(response, self._token)
            label = reply.label
            return reply
        except (trio.TooSlowError, httpx.TimeoutException):
            label = "timeout"
            return relay.RetryLater(f"no answer from {self._where()} within timeout ({self.settings.timeout:g}s)")
        except httpx.HTTPError as exc:
            return self._transport_failure(exc)
        finally:
            self._m_requests.labels(endpoint, label).inc()
            self._m_duration.labels(endpoint).observe(time.perf_counter() - started)

    def _transport_failure(self, exc: httpx.HTTPError) -> relay.RetryLater | relay.Halted:
        detail = str(exc).replace(self._token, "********") or type(exc).__name__
        if (cause := untrusted_certificate(exc)) is not None:
            return relay.Halted(f"TLS: the certificate of {self._where()} is not trusted "
                                f"({cause.verify_message}); set tls.ca_file to the CA that signed it")
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return relay.Halted(f"cannot use url {self.settings.url}: {detail}")
        return relay.RetryLater(f"{self._where()}: {type(exc).__name__}: {detail}")

    def _where(self) -> str:
        parts = urlsplit(self.settings.url)
        return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"

    # -- indexer acknowledgement --------------------------------------------------------------------------

    async def _confirm(self, reply: Reply) -> relay.Result:
        """With `ack: true`, wait for the request's ackId to be confirmed; otherwise accepted is delivered."""
        if self._acks is None:
            if reply.ack_id is not None:
                self._warn_once("hec_ack_ids_ignored", "the token has indexer acknowledgement on; set `ack: true` "
                                "to count entries delivered only once indexed")
            return relay.Delivered()
        if reply.ack_id is None:
            self._warn_once("hec_ack_not_enabled", "`ack: true` but Splunk returned no ackId: acknowledgement is "
                            "off for this token, so entries count delivered once HEC accepts them")
            return relay.Delivered()
        return await self._acks.wait(reply.ack_id)

    async def _poll_acks(self, ack_ids: list[int]) -> PollAnswer:
        reply = await self._request(
            "ack", "POST", ACK_PATH, params={"channel": self._channel}, content=orjson.dumps({"acks": ack_ids}),
            headers={"Content-Type": "application/json", CHANNEL_HEADER: self._channel})
        if not isinstance(reply, Reply):
            return relay.RetryLater(reply.reason)
        verdict = judge(reply, 0)
        if verdict.kind == "halt":
            return relay.Halted(f"polling acknowledgements: {verdict.reason}")
        acks = read_acks(reply) if verdict.kind == "accepted" else None
        if acks is None:
            return relay.RetryLater(f"polling acknowledgements: {verdict.reason or reply.describe()}"
                                    f"{'' if verdict.reason else ' without an acks object'}")
        return acks

    def _warn_once(self, event: str, hint: str) -> None:
        if event not in self._warned:
            self._warned.add(event)
            self.log.warning(event, hint=hint)

    # -- check ----------------------------------------------------------------------------------------------

    async def check(self) -> str:
        """Health endpoint, then the token with an empty request (Splunk answers code 5 "No data" when the
        token is good), then, with `ack: true`, an ack poll on a throwaway channel (never the live one: a
        poll there could consume a confirmation the running relay is waiting for)."""
        health = await self._request("health", "GET", HEALTH_PATH)
        if not isinstance(health, Reply):
            raise relay.CheckFailed(f"health: {health.reason}")
        if health.status != 200:
            raise relay.CheckFailed(f"health: {health.describe()} (HEC disabled, unhealthy or wrong url)")
        probe = str(uuid.uuid4())
        token = await self._request("event", "POST", EVENT_PATH, content=b"",
                                    headers={"Content-Type": "application/json", CHANNEL_HEADER: probe})
        if not isinstance(token, Reply):
            raise relay.CheckFailed(f"token test: {token.reason}")
        if token.code != 5:
            raise relay.CheckFailed(f"token test: {judge(token, 0).reason or token.describe()}")
        done = f"{self._where()}: HEC healthy, token accepted"
        if self.settings.ack:
            acks = await self._request("ack", "POST", ACK_PATH, params={"channel": probe},
                                       content=orjson.dumps({"acks": [0]}),
                                       headers={"Content-Type": "application/json", CHANNEL_HEADER: probe})
            if not isinstance(acks, Reply):
                raise relay.CheckFailed(f"ack test: {acks.reason}")
            if acks.status != 200:
                raise relay.CheckFailed(f"ack test: {judge(acks, 0).reason or acks.describe()}")
            done += ", indexer acknowledgement on"
        return done


def _first_refused(reason: str, total: int) -> relay.Rejected:
    """The request held only the batch's first entry and Splunk refused it: dead-letter it, resend the rest."""
    return relay.Rejected({0: reason}, resend_from=1 if total > 1 else None)


def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@relay.hookimpl
def register_destination_types(register):  # type: ignore[no-untyped-def]
    register(SplunkHecDestination)
