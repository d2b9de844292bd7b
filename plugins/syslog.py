"""Destination `syslog`: RFC 5424 (or RFC 3164) messages over TCP, TLS or UDP, one entry per message.

One persistent connection per destination; after any failure it is dropped and a new one is opened on
the next attempt (the delivery loop spaces the attempts out). A batch counts as delivered once every byte
was written and acknowledged by the receiver's TCP stack, and the connection was still open
`confirm_after` later; otherwise the whole batch is sent again, so TCP and TLS are at-least-once. UDP
cannot confirm anything. The wire format is in `syslog_format`, the connections in `syslog_transport`.

Metrics (besides the delivery loop's `audit_relay_destination_*`):

    # TYPE audit_relay_syslog_connections_total counter      connections opened (TLS: handshakes completed)
    # TYPE audit_relay_syslog_connected gauge                1 while a connection is open
    # TYPE audit_relay_syslog_sent_bytes_total counter       bytes written, framing and re-sends included
    # TYPE audit_relay_syslog_truncated_total counter        UDP messages cut to max_message_size

Logs: `syslog_connected` (info), `syslog_connection_lost` (warning, with the reason),
`syslog_entries_truncated` (warning).
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import trio
from pydantic import BeforeValidator, Field, field_validator, model_validator

import relay

from .syslog_format import Formatter, frame_lf, frame_octet_counting, parse_facility, parse_severity
from .syslog_format import truncate_utf8 as _truncate
from .syslog_transport import DatagramLink, LinkError, StreamLink, TlsOptions, build_ssl_context

UDP_MAX = 65_507
"""The largest UDP payload over IPv4 (65,535 - 8 - 20)."""
DEFAULT_PORTS = {"tcp": 514, "udp": 514, "tls": 6514}
DEFAULT_MAX_SIZE = {"tcp": 64 * 1024, "tls": 64 * 1024, "udp": 2048}


def _severity_rules(value: Any) -> Any:
    """`notice`, or `{"*.deleted": warning, "*": info}`: globs on the action, first match wins."""
    if isinstance(value, dict):
        rules = []
        for glob, level in value.items():
            if not isinstance(glob, str) or not glob:
                raise ValueError("severity: each key must be a glob on the action, e.g. '*.deleted'")
            try:
                rules.append((glob, parse_severity(level)))
            except ValueError as exc:
                raise ValueError(f"severity for {glob!r}: {exc}") from None
        return tuple(rules)
    if isinstance(value, tuple):
        return value
    return (("*", parse_severity(value)),)


Facility = Annotated[int, BeforeValidator(parse_facility)]
SeverityRules = Annotated[tuple[tuple[str, int], ...], BeforeValidator(_severity_rules)]


class TlsSettings(relay.Settings):
    ca_file: Path | None = None
    """PEM file of the CA(s) to trust for the receiver's certificate; default: the system's CAs."""
    cert_file: Path | None = None
    """Client certificate (PEM), for receivers that require one; may also hold the key."""
    key_file: Path | None = None
    key_password: relay.Secret | None = None
    """Password of an encrypted `key_file`."""
    verify: bool = True
    """Check the receiver's certificate and that it names `server_name`. Turn off only for tests."""
    server_name: str | None = None
    """The name the certificate must hold (and SNI); default `host`."""
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file needs tls.cert_file (the client certificate)")
        if self.key_password is not None and self.cert_file is None:
            raise ValueError("tls.key_password needs tls.cert_file and tls.key_file")
        return self


class SyslogSettings(relay.Settings):
    host: str = Field(min_length=1)
    """The receiver: a name or an IP address."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """Default 514 for tcp and udp, 6514 for tls."""
    transport: Literal["tcp", "tls", "udp"] = "tcp"
    framing: Literal["octet-counting", "lf"] = "octet-counting"
    """TCP only: RFC 6587 octet counting (safe for any content), or a line feed after each message."""
    format: Literal["rfc5424", "rfc3164"] = "rfc5424"
    facility: Facility = 10
    """A name (`authpriv`, `local0`, ...) or 0-23. Default authpriv: audit data is security data."""
    severity: SeverityRules = (("*", 5),)
    """`notice`, or globs on the action mapped to severities (first match wins; unmatched: notice)."""
    app_name: str = Field(default="audit-relay", min_length=1, max_length=48)
    hostname: str | None = Field(default=None, min_length=1, max_length=255)
    """HOSTNAME field; default this machine's fully qualified name."""
    enterprise_number: int = Field(default=32473, gt=0)
    """The IANA private enterprise number in the structured-data id `audit@<number>`."""
    tls: TlsSettings = TlsSettings()
    confirm_after: relay.Duration = Field(default=1.0, ge=0)
    """TCP/TLS: a batch counts as delivered once the receiver acknowledged it and the connection was still
    open this long after; if it breaks sooner the batch is sent again. 0 trusts acknowledgements alone."""
    timeout: relay.Duration = Field(default=10.0, gt=0)
    """For connecting (with the TLS handshake), for each write to make progress and for the receiver to
    acknowledge a batch."""
    max_message_size: relay.ByteSize | None = Field(default=None, ge=480)
    """Largest syslog message (framing excluded); default 64KiB for tcp/tls, 2048 for udp (max 65507)."""
    truncate: bool = False
    """UDP only: cut messages over max_message_size instead of dead-lettering their entries."""

    @field_validator("app_name", "hostname")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and not all("!" <= c <= "~" for c in value):
            raise ValueError("must be printable US-ASCII without spaces (RFC 5424)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SyslogSettings:
        given = self.model_fields_set
        if self.transport == "tls" and self.framing != "octet-counting":
            raise ValueError("transport tls requires framing: octet-counting (RFC 5425)")
        if self.transport == "udp" and "framing" in given:
            raise ValueError("framing applies to tcp only (udp sends one message per datagram)")
        if self.transport != "tls" and "tls" in given:
            raise ValueError(f"tls settings are given but transport is {self.transport}: set transport: tls "
                             f"(or remove the tls block)")
        if self.transport == "udp" and "confirm_after" in given:
            raise ValueError("confirm_after applies to tcp and tls only (udp confirms nothing)")
        if self.truncate and self.transport != "udp":
            raise ValueError("truncate applies to udp only; over tcp/tls oversized entries are dead-lettered")
        if self.transport == "udp" and self.max_message_size is not None and self.max_message_size > UDP_MAX:
            raise ValueError(f"max_message_size over udp can be at most {UDP_MAX} bytes (the IPv4 limit)")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.transport]

    @property
    def effective_max_message_size(self) -> int:
        return self.max_message_size or DEFAULT_MAX_SIZE[self.transport]


class SyslogDestination(relay.Destination):
    type_name = "syslog"
    Settings = SyslogSettings
    batch_defaults = relay.BatchDefaults(max_entries=1000, max_bytes=1024 * 1024, max_wait=0.2)
    concurrency_default = 16
    """Batches waiting out `confirm_after` at once; they are still written one after another, in order."""
    settings: SyslogSettings

    @classmethod
    def default_concurrency(cls, settings: Any) -> int:
        """16 while batches wait out `confirm_after`; 1 when nothing waits (udp, or `confirm_after: 0`)."""
        waits = settings.transport != "udp" and settings.confirm_after > 0
        return cls.concurrency_default if waits else 1

    def attempt_timeout(self, send_timeout: float) -> float:
        """`confirm_after` is part of every successful attempt: it does not eat into `send_timeout`."""
        return send_timeout + (self.settings.confirm_after if self.settings.transport != "udp" else 0.0)

    _link: StreamLink | DatagramLink | None = None

    async def open(self) -> None:
        s = self.settings
        hostname: str = s.hostname if s.hostname else await trio.to_thread.run_sync(socket.getfqdn)
        self._formatter = Formatter(
            rfc=s.format, facility=s.facility, severities=s.severity, app_name=s.app_name, hostname=hostname,
            procid=os.getpid(), enterprise_number=s.enterprise_number)
        self._frame = frame_lf if s.framing == "lf" else frame_octet_counting
        self._lock = trio.Lock()
        self._ssl_context: ssl.SSLContext | None = None
        self._m_connections = self.context.counter(
            "syslog_connections_total", "Syslog connections opened (TLS: handshakes completed).")
        self._m_connected = self.context.gauge("syslog_connected", "1 while the syslog connection is open.")
        self._m_bytes = self.context.counter(
            "syslog_sent_bytes_total", "Bytes written to the syslog receiver, framing and re-sends included.")
        self._m_truncated = self.context.counter(
            "syslog_truncated_total", "UDP syslog messages cut to max_message_size.")

    async def send(self, batch: relay.Batch) -> relay.Result:
        indexes, messages, reasons = self._messages(batch)
        if messages:
            async with self._lock:  # one connection: batches never interleave, whatever `concurrency` is
                try:
                    link, refused = await self._write(messages)
                except LinkError as exc:
                    await self._drop(exc.reason)
                    return relay.Halted(exc.reason) if exc.permanent else relay.RetryLater(exc.reason)
            if isinstance(link, StreamLink) and (lost := await self._confirm(link)) is not None:
                return relay.RetryLater(lost)
            reasons.update((indexes[i], reason) for i, reason in refused.items())
        return relay.Rejected(reasons) if reasons else relay.Delivered()

    async def _confirm(self, link: StreamLink) -> str | None:
        """Wait `confirm_after` (without holding the connection: the next batch is written meanwhile),
        then check the connection is still open. None if it is; else why the batch must be sent again.

        A receiver that is shutting down stops reading before it closes its connections; what its kernel
        acknowledged in between is lost. Seeing the connection outlive the batch by `confirm_after`
        catches that case (a restart, a redeploy), which acknowledgements alone cannot.
        """
        delay = self.settings.confirm_after
        if delay > 0:
            with trio.move_on_after(delay):
                await link.lost.wait()
            async with self._lock:
                if link is self._link and not link.lost.is_set():
                    try:
                        await link.ensure_open()
                    except LinkError as exc:
                        await self._drop(exc.reason)
        if link.lost.is_set():
            return (f"the connection failed within confirm_after ({delay:g}s) of writing this batch, so the "
                    f"receiver may not have read it; sending it again ({link.lost_reason})")
        return None

    def _messages(self, batch: relay.Batch) -> tuple[list[int], list[bytes], dict[int, str]]:
        """One message per entry (with its index in the batch); entries over `max_message_size` are
        refused with the reason, or cut if `truncate` is on (udp)."""
        limit = self.settings.effective_max_message_size
        udp = self.settings.transport == "udp"
        indexes: list[int] = []
        messages: list[bytes] = []
        reasons: dict[int, str] = {}
        truncated = 0
        for index, entry in enumerate(batch.entries):
            message = self._formatter.message(entry.data, entry.occurred_at, entry.action)
            if len(message) > limit:
                if self.settings.truncate:
                    message = _truncate(message, limit)
                    truncated += 1
                else:
                    reasons[index] = (
                        f"the syslog message for this entry is {len(message)} bytes, over max_message_size "
                        f"({limit} bytes); raise max_message_size (and the receiver's limit, e.g. syslog-ng's "
                        f"log-msg-size())" + (", or set truncate: true" if udp else ""))
                    continue
            indexes.append(index)
            messages.append(message)
        if truncated:
            self._m_truncated.inc(truncated)
            self.log.warning("syslog_entries_truncated", batch=batch.id, count=truncated, max_message_size=limit)
        return indexes, messages, reasons

    async def _write(self, messages: list[bytes]) -> tuple[StreamLink | DatagramLink, dict[int, str]]:
        """Deliver `messages` over the connection (opened if needed). Returns the connection and the indexes
        (into `messages`) the system refused as too large for a datagram. Raises `LinkError`."""
        try:
            link = await self._connected()
            if isinstance(link, DatagramLink):
                refused = await link.send(messages)
                self._m_bytes.inc(sum(len(m) for i, m in enumerate(messages) if i not in refused))
                return link, refused
            try:
                await link.ensure_open()
            except LinkError as exc:  # closed by the receiver while idle: not this batch's failure
                if exc.permanent:  # a TLS alert: the receiver refuses us
                    raise
                await self._drop(exc.reason)
                link = await self._connected()
                assert isinstance(link, StreamLink)
            data = b"".join(self._frame(m) for m in messages)
            await link.send(data)
            self._m_bytes.inc(len(data))
            return link, {}
        except BaseException as exc:
            if not isinstance(exc, LinkError):  # cancelled (send_timeout, shutdown) mid-write: unusable
                with trio.CancelScope(shield=True):
                    await self._drop(f"the attempt was cut short ({type(exc).__name__})")
            raise

    async def _connected(self) -> StreamLink | DatagramLink:
        if self._link is not None and self._link.connected:
            return self._link
        s = self.settings
        link: StreamLink | DatagramLink
        if s.transport == "udp":
            link = DatagramLink(s.host, s.effective_port, s.timeout)
        else:
            link = StreamLink(s.host, s.effective_port, s.timeout, await self._tls_context(), s.tls.server_name)
        await link.connect()
        self._link = link
        self._m_connections.inc()
        self._m_connected.set(1)
        self.log.info("syslog_connected", address=link.address, transport=s.transport,
                      tls_version=getattr(link, "tls_version", None))
        return link

    async def _tls_context(self) -> ssl.SSLContext | None:
        """Built on first use (and again after a failure), so a fixed CA file is picked up without restart."""
        if self.settings.transport != "tls":
            return None
        if self._ssl_context is None:
            tls = self.settings.tls
            options = TlsOptions(tls.ca_file, tls.cert_file, tls.key_file,
                                 tls.key_password.reveal() if tls.key_password else None, tls.verify,
                                 tls.min_version)
            self._ssl_context = await trio.to_thread.run_sync(build_ssl_context, options)
        return self._ssl_context

    async def _drop(self, reason: str) -> None:
        """Abandon the connection after a failure (no close_notify: the peer may not be reading)."""
        link, self._link = self._link, None
        self._ssl_context = None  # rebuilt on the next connect, so a corrected CA or key file is read
        if link is not None:
            if isinstance(link, StreamLink):
                link.mark_lost(reason)
            self._m_connected.set(0)
            self.log.warning("syslog_connection_lost", address=link.address, reason=reason)
            await link.aclose(graceful=False)

    async def check(self) -> str:
        async with self._lock:
            try:
                link = await self._connected()
                if isinstance(link, StreamLink):
                    await link.ensure_open()
            except LinkError as exc:
                await self._drop(exc.reason)
                raise relay.CheckFailed(exc.reason) from None
        s = self.settings
        if isinstance(link, DatagramLink):
            return f"udp to {link.address}: address resolved (UDP cannot confirm that a receiver listens)"
        if s.transport == "tls":
            verified = (f"certificate verified for {s.tls.server_name or s.host!r}" if s.tls.verify
                        else "certificate NOT verified (tls.verify: false)")
            return f"connected to {link.address} over {link.tls_version}, {verified}"
        return f"connected to {link.address} over tcp ({s.framing})"

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self._m_connected.set(0)
            await link.aclose(graceful=True)


@relay.hookimpl
def register_destination_types(register):  # type: ignore[no-untyped-def]
    register(SyslogDestination)
