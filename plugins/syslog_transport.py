"""Syslog transports: one TCP or TLS connection (trio streams), or one connected UDP socket.

What a sender can confirm over plain syslog is limited, and this module does all it can:

* TCP/TLS: after writing a batch it waits until the receiver's TCP stack has acknowledged every byte
  (the socket's send queue is empty, Linux `SIOCOUTQ`), then checks that the receiver has not closed or
  reset the connection. Before each batch it checks the same, so a connection the receiver closed while
  idle is replaced instead of swallowing a batch. What TCP cannot confirm: that the receiving program read
  and stored the bytes its kernel acknowledged (the destination's `confirm_after` narrows that down).
  Anything unconfirmed is sent again: at-least-once.
* UDP: nothing is acknowledged. A connected socket at least reports ICMP "port unreachable" on a later
  send, which is turned into a retry.

Errors from sockets, DNS and TLS are translated once, here, into `LinkError` with a readable reason and
whether retrying can help (`permanent` means a configuration problem: the destination halts).
No metrics; logs nothing (the destination logs connections and losses).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import ssl
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

__all__ = ["DatagramLink", "LinkError", "StreamLink", "TlsOptions", "build_ssl_context"]

CHUNK = 256 * 1024
"""Bytes handed to the stream at a time; `timeout` applies to each chunk, so it measures lack of progress."""
TLS13_VERDICT_WAIT = 0.25
"""Longest wait after a TLS 1.3 handshake for the receiver's session tickets or alert (see `connect`)."""
TLS_HOUSEKEEPING_GRACE = 0.01
"""How long to let a TLS stream finish reading records that carry no data (TLS 1.3 session tickets)."""
_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)
_SIOCOUTQ = 0x5411 if sys.platform.startswith("linux") else None  # == termios.TIOCOUTQ on Linux
_UNTRUSTED = " (tls.ca_file must hold the CA that signed the receiver's certificate)"
_VERIFY_HINTS = {  # OpenSSL X509_V_ERR_* codes
    2: _UNTRUSTED, 18: _UNTRUSTED, 19: _UNTRUSTED, 20: _UNTRUSTED, 21: _UNTRUSTED,
    62: " (the certificate does not name this host: set tls.server_name to a name it holds)",
}


class LinkError(Exception):
    """A connection-level failure, described for an operator; `permanent` means retrying cannot help."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class TlsOptions:
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    key_password: str | None
    verify: bool
    min_version: Literal["1.2", "1.3"]


def build_ssl_context(options: TlsOptions) -> ssl.SSLContext:
    """A client context: TLS 1.2 or newer, the CA file (or the system's CAs), hostname checking, client
    certificate. Raises `LinkError(permanent=True)` naming the setting whose file is unusable."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    except ssl.SSLError as exc:  # pragma: no cover - a broken system trust store
        raise LinkError(f"cannot load the system's CA certificates: {_ssl_text(exc)}", permanent=True) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if options.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    if options.ca_file is not None:
        context = _with_ca_file(context, options.ca_file)
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if options.cert_file is not None:
        try:
            context.load_cert_chain(options.cert_file, options.key_file, password=options.key_password or None)
        except OSError as exc:
            raise LinkError(f"tls.cert_file/tls.key_file: cannot read {exc.filename or options.cert_file}: "
                            f"{exc.strerror}", permanent=True) from exc
        except (ssl.SSLError, ValueError) as exc:
            raise LinkError(f"tls.cert_file/tls.key_file: cannot load the client certificate and key "
                            f"({_ssl_text(exc)}; a wrong or missing tls.key_password also shows as this)",
                            permanent=True) from exc
    return context


def _with_ca_file(context: ssl.SSLContext, ca_file: Path) -> ssl.SSLContext:
    fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only the given CAs, not the system's as well
    fresh.minimum_version = context.minimum_version
    fresh.options = context.options
    try:
        fresh.load_verify_locations(cafile=ca_file)
    except OSError as exc:
        raise LinkError(f"tls.ca_file: cannot read {ca_file}: {exc.strerror}", permanent=True) from exc
    except ssl.SSLError as exc:
        raise LinkError(f"tls.ca_file: {ca_file} holds no usable PEM certificate ({_ssl_text(exc)})",
                        permanent=True) from exc
    return fresh


class StreamLink:
    """One TCP or TLS connection to the receiver; replaced by a new one after any failure."""

    def __init__(self, host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None = None,
                 server_name: str | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.server_name = server_name or host
        self.address = _address(host, port)
        self.tls_version: str | None = None
        self.lost = trio.Event()
        """Set when the connection failed; batches still being confirmed on it are sent again."""
        self.lost_reason = ""
        self._stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        self._socket: trio.socket.SocketType | None = None

    @property
    def connected(self) -> bool:
        return self._stream is not None

    async def connect(self) -> None:
        """Open the connection and complete the TLS handshake, within `timeout`."""
        try:
            with trio.fail_after(self.timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                if self.ssl_context is None:
                    self._stream, self._socket = tcp, tcp.socket
                    return
                tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.server_name)
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tls)
                    raise
                self._stream, self._socket = tls, tcp.socket
                self.tls_version = tls.version()
        except trio.TooSlowError:
            raise LinkError(f"no connection to {self.address} within timeout ({self.timeout:g}s)") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise self._translate(exc, "connecting to") from exc
        if self.tls_version == "TLSv1.3":
            await self._await_tls13_verdict()

    async def _await_tls13_verdict(self) -> None:
        """In TLS 1.3 the receiver judges our client certificate only after our side of the handshake is
        done, and answers with session tickets or an alert. Waiting briefly for that answer turns a refused
        certificate into a clear error now instead of a broken pipe in the middle of the first batch."""
        assert self._socket is not None
        with trio.move_on_after(min(self.timeout, TLS13_VERDICT_WAIT)):
            await trio.lowlevel.wait_readable(self._socket)
        try:
            await self.ensure_open()
        except LinkError:
            await self.aclose(graceful=False)
            raise

    async def send(self, data: bytes) -> None:
        """Write `data` and wait until the receiver's TCP stack has acknowledged all of it, and the
        connection is still open; raise `LinkError` otherwise (the caller sends the whole batch again)."""
        stream = self._stream
        assert stream is not None
        view = memoryview(data)
        try:
            for start in range(0, len(view), CHUNK):
                with trio.move_on_after(self.timeout) as scope:
                    await stream.send_all(view[start:start + CHUNK])
                if scope.cancelled_caught:
                    raise LinkError(f"{self.address} took no data for timeout ({self.timeout:g}s)")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._translate(exc, "writing to") from exc
        await self._wait_acknowledged()
        await self.ensure_open()

    async def ensure_open(self) -> None:
        """Raise `LinkError` if the receiver closed or reset the connection. Syslog receivers never send
        data, so anything readable is end-of-stream, an error, or TLS housekeeping (read and ignored)."""
        stream = self._stream
        if stream is None:
            raise LinkError(f"not connected to {self.address}")
        for _ in range(64):
            if not self._readable():
                return
            try:
                with trio.move_on_after(TLS_HOUSEKEEPING_GRACE):
                    data = await stream.receive_some(65536)
                    if not data:
                        raise LinkError(f"{self.address} closed the connection")
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._translate(exc, "reading from") from exc

    async def _wait_acknowledged(self) -> None:
        """Wait until the socket's send queue is empty: every byte reached the receiver's TCP stack.

        The kernel signals no event for this, so the queue is polled, starting fast (a receiver on the
        same network acknowledges within a millisecond) and backing off to 20 ms.
        """
        if _SIOCOUTQ is None or self._socket is None:
            return  # other systems: only the write and the open connection are confirmed
        fd = self._socket.fileno()
        deadline = trio.current_time() + self.timeout
        delay = 0.0002
        while (pending := _unacknowledged(fd)) > 0:
            if self._readable():
                await self.ensure_open()  # raises if closed or reset; else it was TLS housekeeping
            if trio.current_time() >= deadline:
                raise LinkError(f"{self.address} did not acknowledge {pending} bytes within timeout "
                                f"({self.timeout:g}s)")
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _readable(self) -> bool:
        assert self._socket is not None
        poller = select.poll()
        poller.register(self._socket.fileno(), _READABLE)
        return bool(poller.poll(0))

    def mark_lost(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()

    async def aclose(self, graceful: bool = True) -> None:
        """Close the connection; over TLS, a graceful close sends close_notify first (RFC 5425 4.4)."""
        stream, self._stream, self._socket = self._stream, None, None
        if stream is None:
            return
        if graceful:
            with trio.move_on_after(self.timeout):
                try:
                    await stream.aclose()
                    return
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        await trio.aclose_forcefully(stream)

    def _translate(self, exc: BaseException, doing: str) -> LinkError:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        if isinstance(cause, ssl.SSLCertVerificationError):
            hint = _VERIFY_HINTS.get(cause.verify_code, "")
            return LinkError(f"TLS handshake with {self.address} failed: certificate verify failed: "
                             f"{cause.verify_message.rstrip('.')}{hint}", permanent=True)
        if isinstance(cause, ssl.SSLError):
            if not _ssl_transient(cause):
                return LinkError(f"TLS with {self.address} failed: {_ssl_text(cause)}{_ssl_hint(cause)}",
                                 permanent=True)
            if doing == "connecting to":
                return LinkError(f"{self.address} closed the connection during the TLS handshake (is it a TLS "
                                 f"port? does it require a client certificate, tls.cert_file?)")
            return LinkError(f"{self.address} ended the TLS connection without close_notify")
        if isinstance(cause, socket.gaierror):
            return LinkError(f"cannot resolve {self.host!r}: {cause.strerror}")
        if isinstance(exc, trio.ClosedResourceError):
            return LinkError(f"the connection to {self.address} was closed")
        return LinkError(f"{doing} {self.address} failed: {_os_text(cause if cause is not None else exc)}")


class DatagramLink:
    """A connected UDP socket: one datagram per message; ICMP errors come back on later sends."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.address = _address(host, port)
        self._socket: trio.socket.SocketType | None = None

    @property
    def connected(self) -> bool:
        return self._socket is not None

    async def connect(self) -> None:
        try:
            with trio.fail_after(self.timeout):
                infos = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
                family, kind, proto, _, address = infos[0]
                sock = trio.socket.socket(family, kind, proto)
                try:
                    await sock.connect(address)
                except BaseException:
                    sock.close()
                    raise
        except trio.TooSlowError:
            raise LinkError(f"cannot resolve {self.host!r} within timeout ({self.timeout:g}s)") from None
        except socket.gaierror as exc:
            raise LinkError(f"cannot resolve {self.host!r}: {exc.strerror}") from exc
        except OSError as exc:
            raise LinkError(f"cannot use {self.address}: {_os_text(exc)}") from exc
        self._socket = sock

    async def send(self, datagrams: Sequence[bytes]) -> dict[int, str]:
        """Send each datagram; return the indexes the system refused as too large (with the reason)."""
        sock = self._socket
        assert sock is not None
        refused: dict[int, str] = {}
        self._raise_pending_error()
        for index, datagram in enumerate(datagrams):
            try:
                with trio.fail_after(self.timeout):
                    await sock.send(datagram)
            except trio.TooSlowError:
                raise LinkError(f"the system did not take a datagram for {self.address} within timeout "
                                f"({self.timeout:g}s)") from None
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    refused[index] = (f"the system refused a {len(datagram)}-byte datagram as too large for "
                                      f"{self.address}; lower max_message_size or use tcp")
                    continue
                raise LinkError(f"sending to {self.address} failed: {_os_text(exc)}") from exc
        self._raise_pending_error()
        return refused

    def _raise_pending_error(self) -> None:
        assert self._socket is not None
        code = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise LinkError(f"sending to {self.address} failed: {_os_text(OSError(code, os.strerror(code)))}")

    async def aclose(self, graceful: bool = True) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
        await trio.lowlevel.checkpoint()


def _unacknowledged(fd: int) -> int:
    assert _SIOCOUTQ is not None
    result: int = struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQ, b"\0\0\0\0"))[0]
    return result


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_text(exc: BaseException) -> str:
    """`Connection refused`, or for trio's "all attempts failed" the distinct reasons of the attempts."""
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):
        reasons = dict.fromkeys(_os_text(e) for e in group.exceptions)
        return "; ".join(reasons)
    if isinstance(exc, OSError) and exc.strerror:
        if exc.errno == errno.ECONNREFUSED:
            return "connection refused (is the receiver listening on this port?)"
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _ssl_transient(exc: ssl.SSLError) -> bool:
    """An end of stream in the middle of TLS (the receiver went away): worth retrying."""
    return isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError) or \
        exc.reason in ("UNEXPECTED_EOF_WHILE_READING",)


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc)


def _ssl_hint(exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    if reason == "WRONG_VERSION_NUMBER":
        return " (does this port speak TLS? use transport: tcp for a plain-text port)"
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                  "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV1_ALERT_ACCESS_DENIED"):
        return " (the receiver refused the handshake: check tls.cert_file/tls.key_file and its CA)"
    if reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"):
        return " (no common TLS version: the receiver must support TLS 1.2 or newer, see tls.min_version)"
    return ""
