"""A TCP proxy in front of a real HTTP/1.1 peer that can fail or hold requests, for fault tests.

It forwards bytes unchanged (so SigV4 signatures, which cover the Host header, still verify upstream), or
answers a canned error, or forwards a request and withholds the answer (the peer has acted, the client never
hears: what a crash or a timeout mid-upload looks like), or takes a request and never answers (a hung
peer). `refuse()` makes the peer look down (connections refused, open ones cut) until `resume()`. It runs
in threads, so it works the same for in-process tests and for a relay running as a subprocess. Every
request's method and path is recorded.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["forward", "fail", "hold", "drop", "stall"]
"""forward: pass through · fail: answer `fail_response` · hold: forward, withhold the answer ·
drop: read the request and close the connection without an answer · stall: read the request, never
forward it, never answer (until the proxy stops)."""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    outcome: str


@dataclass
class FaultProxy:
    upstream: tuple[str, int]
    mode: Mode = "forward"
    fail_count: int = 0
    """In `fail` mode, answer this many requests with `fail_response`, then forward the rest."""
    fail_response: bytes = b""
    hold_forwarded: int | None = None
    """In `hold` mode, forward only this many held requests; later ones never reach the peer (None: all)."""
    methods: frozenset[str] = frozenset({"PUT"})
    """Only these methods are failed or held; others are always forwarded."""
    seen: list[Seen] = field(default_factory=list)
    held: threading.Event = field(default_factory=threading.Event)
    """Set when a request has been forwarded and its answer withheld."""
    tls: ssl.SSLContext | None = None
    """Serve HTTPS to the client with this server context (the upstream leg stays plain)."""
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: socketserver.ThreadingTCPServer | None = None
    _placeholder: socket.socket | None = None
    """While refusing: a socket bound to `port` without listening, so connections are refused and
    nobody else takes the port meanwhile."""
    _clients: set[socket.socket] = field(default_factory=set)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> FaultProxy:
        self._listen(0)
        return self

    def _listen(self, port: int) -> None:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                client = self.request
                with proxy._lock:
                    proxy._clients.add(client)
                try:
                    if proxy.tls is not None:
                        try:
                            client = proxy.tls.wrap_socket(client, server_side=True)
                        except (ssl.SSLError, OSError):
                            return  # the client refused our certificate
                    proxy._handle(client)
                finally:
                    with proxy._lock:
                        proxy._clients.discard(self.request)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True  # rebinding the port `refuse()` gave up, next to its TIME_WAITs
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                if not isinstance(sys.exc_info()[1], OSError):  # a connection cut by `refuse()` is expected
                    super().handle_error(request, client_address)  # type: ignore[arg-type]

        server = Server(("127.0.0.1", port), Handler, bind_and_activate=True)
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True).start()

    def refuse(self) -> None:
        """Look like a peer that is down: refuse new connections and cut the open ones."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        placeholder = socket.socket()
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        placeholder.bind(("127.0.0.1", self.port))
        self._placeholder = placeholder
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

    def resume(self) -> None:
        """Accept connections again on the same port."""
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        if self._server is None:
            self._listen(self.port)

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._placeholder is not None:
            self._placeholder.close()

    def count(self, method: str = "PUT") -> int:
        with self._lock:
            return sum(1 for seen in self.seen if seen.method == method)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _decide(self, method: str) -> str:
        with self._lock:
            if method not in self.methods:
                return "forward"
            if self.mode == "fail":
                if self.fail_count > 0:
                    self.fail_count -= 1
                    return "fail"
                return "forward"
            if self.mode == "hold" and self.hold_forwarded is not None:
                if self.hold_forwarded <= 0:
                    return "stall"
                self.hold_forwarded -= 1
            return self.mode

    def _handle(self, client: socket.socket) -> None:
        while True:
            request = _read_message(client, request=True)
            if request is None:
                client.close()
                return
            head, body = request
            method, path, headers = _parse_head(head)
            action = self._decide(method)
            with self._lock:
                self.seen.append(Seen(method, path, headers, body, action))
            if action == "fail":
                client.sendall(self.fail_response)
                client.close()
                return
            if action == "drop":
                client.close()
                return
            if action == "stall":
                self._stopped.wait()  # neither the peer nor the client ever hears of it
                return
            with socket.create_connection(self.upstream, timeout=30) as upstream:
                upstream.sendall(head + body)
                response = _read_message(upstream, request=False)
            if action == "hold":
                self.held.set()
                self._stopped.wait()  # the client waits for an answer that never comes
                return
            if response is None:
                client.close()
                return
            client.sendall(response[0] + response[1])
            if b"connection: close" in response[0].lower():
                client.close()
                return


def _read_message(sock: socket.socket, *, request: bool) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 message (head, body) with a Content-Length body (or up to EOF for an answer)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return None
        if not chunk:
            return None
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    head += b"\r\n\r\n"
    _, _, headers = _parse_head(head)
    length = headers.get("content-length")
    if length is not None:
        want = int(length)
        if not request and head.split(b" ", 2)[1:2] == [b"304"]:
            want = 0
        while len(body) < want:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    elif not request:
        while chunk := sock.recv(65536):
            body += chunk
    return head, body


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return first[0], first[1] if len(first) > 1 else "", headers


def http_answer(status: int, reason: str, body: bytes, content_type: str = "application/json",
                extra_headers: str = "") -> bytes:
    """A canned HTTP/1.1 answer that closes the connection."""
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra_headers}Connection: close\r\n\r\n").encode()
    return head + body


def s3_error(status: int, reason: str, code: str, message: str, extra_headers: str = "") -> bytes:
    """A canned S3 error answer, as S3 writes it."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>FAULTPROXY</RequestId></Error>").encode()
    return http_answer(status, reason, body, "application/xml", extra_headers)


@contextmanager
def fault_proxy(upstream: tuple[str, int], **kwargs: object) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield proxy
    finally:
        proxy.stop()
