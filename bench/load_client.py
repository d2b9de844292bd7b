"""A lean HTTP/1.1 load client: one keep-alive socket per thread, request heads formatted per request.

The push benchmark's client shares the machine's cores with the relay. httpx on trio spent ~10 us of CPU per
entry (a quarter of a core at 25k entries/s), CPU the relay then did not have; a sender in production runs
elsewhere. This client spends a fraction of that: blocking sockets in threads, each body sent as it is,
and of each answer only the status and the JSON body's `accepted` read.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import orjson


@dataclass
class Outcome:
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    errors: list[str] = field(default_factory=list)


def post_all(host: str, port: int, path: str, headers: dict[str, str], payloads: list[bytes],
             concurrency: int, rate: float | None = None) -> Outcome:
    """POST every payload over `concurrency` connections: closed loop (each connection sends its next
    request once answered), or open loop with request i due at i / `rate` seconds."""
    fixed = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{fixed}Content-Length: "
    queue = list(enumerate(payloads))
    queue.reverse()
    outcome = Outcome()
    lock = threading.Lock()
    start = time.perf_counter()

    def connection() -> None:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffered = b""
        try:
            while True:
                try:
                    index, body = queue.pop()
                except IndexError:
                    return
                if rate is not None:
                    delay = start + index / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                sent = time.perf_counter()
                sock.sendmsg([f"{head}{len(body)}\r\n\r\n".encode(), body])
                status, answer, buffered = _read_response(sock, buffered)
                latency = time.perf_counter() - sent
                with lock:
                    outcome.latencies.append(latency)
                    if status == 200:
                        outcome.accepted += orjson.loads(answer)["accepted"]
                    else:
                        outcome.errors.append(f"{status}: {answer[:200]!r}")
        finally:
            sock.close()

    def guarded() -> None:
        try:
            connection()
        except OSError as exc:  # refused, reset or closed: the run is void, and says why
            with lock:
                outcome.errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=guarded) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcome.elapsed = time.perf_counter() - start
    return outcome


def _read_response(sock: socket.socket, buffered: bytes) -> tuple[int, bytes, bytes]:
    """(status, body, bytes read past it) of the next response; its length from `Content-Length`."""
    while b"\r\n\r\n" not in buffered:
        buffered += _receive(sock)
    head, _, rest = buffered.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += _receive(sock)
    return status, rest[:length], rest[length:]


def _receive(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the server closed the connection")
    return data
