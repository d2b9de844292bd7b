"""Hostile clients against the push receiver: slowloris, oversized headers, 10,000 connections opened and
held, forged signatures at a high rate. Meanwhile a valid client keeps pushing signed entries and every
one of its requests must be answered 200; the receiver's memory (RSS of the relay process) must stay
within a generous bound, and nothing an attacker sent may be stored.

The relay runs as systemd starts it: with a soft limit of 1024 open files (the hard limit is higher), so
10,000 held connections would starve valid clients unless the relay raises its own limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers import RelayProcess, config_dict, free_port, journal_db, wait_until_sync, write_config
from tests.reliability.leaks import ENV, RECEIVER_SIGNING, RECEIVER_TOKEN, Leaks
from tests.reliability.pusher import numbered

MiB = 1024 * 1024
HELD = 10_000


def signature(body: bytes, secret: str = RECEIVER_SIGNING, at: float | None = None) -> str:
    """WorkOS-Signature, computed here from WorkOS's description, not with the relay's code."""
    ms = int((time.time() if at is None else at) * 1000)
    return f"t={ms}, v1={hmac.new(secret.encode(), f'{ms}.'.encode() + body, hashlib.sha256).hexdigest()}"


@dataclass
class Receiver:
    relay: RelayProcess
    port: int
    state: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/entries"

    @property
    def process(self) -> psutil.Process:
        assert self.relay.proc is not None and self.relay.proc.poll() is None, "the relay is not running"
        return psutil.Process(self.relay.proc.pid)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def journaled(self) -> tuple[set[str], int]:
        """Ids of every journaled entry, and how many items are in quarantine."""
        with journal_db(self.state) as db:
            ids = {json.loads(row[0])["id"] for row in db.execute("SELECT data FROM entries")}
            return ids, db.execute("SELECT count(*) FROM quarantine").fetchone()[0]


@contextlib.contextmanager
def soft_open_files_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    tmp = tmp_path_factory.mktemp("hostile")
    creds = tmp / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "receiver-signing").write_text(RECEIVER_SIGNING + "\n")
    port = free_port()
    config = write_config(tmp / "relay.yaml", config_dict(
        tmp, {"push": {"type": "http", "listen": f"127.0.0.1:{port}", "read_timeout": "10s",
                       "request_timeout": "3s", "keep_alive": "15s", "max_body_size": "1MiB",
                       "auth": {"bearer_tokens": ["${RECEIVER_TOKEN}"],
                                "signature_secret": "${file:receiver-signing}"}}},
        {"out": {"type": "file", "path": str(tmp / "out.jsonl"), "batch": {"max_wait": "50ms"}}}))
    relay = RelayProcess(config, tmp / "relay.log", env={**ENV, "CREDENTIALS_DIRECTORY": str(creds)})
    with soft_open_files_limit(1024):  # as systemd starts it (LimitNOFILE=1024:524288 by default)
        relay.start()
    try:
        yield Receiver(relay, port, tmp / "state")
    finally:
        relay.stop_quietly()


@dataclass
class ValidClient:
    """Pushes signed batches of entries, one request at a time, until stopped; every answer is recorded."""

    url: str
    prefix: str
    answers: Counter[str] = field(default_factory=Counter)
    acked: set[str] = field(default_factory=set)
    slowest: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ValidClient:
        self._thread = threading.Thread(target=self._run, name=f"valid-{self.prefix}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(timeout=20.0) as client:
            n = 0
            while not self._stop.is_set():
                batch = [numbered(self.prefix, n + i) for i in range(20)]
                body = json.dumps(batch).encode()
                started = time.monotonic()
                try:
                    response = client.post(self.url, content=body, headers={
                        "authorization": f"Bearer {RECEIVER_TOKEN}", "content-type": "application/json",
                        "workos-signature": signature(body)})
                    self.answers[str(response.status_code)] += 1
                    if response.status_code == 200:
                        self.acked.update(e["id"] for e in batch)
                except httpx.HTTPError as exc:
                    self.answers[type(exc).__name__] += 1
                self.slowest = max(self.slowest, time.monotonic() - started)
                n += 20
                self._stop.wait(0.05)

    def check(self, receiver: Receiver, at_least: int = 5) -> None:
        assert set(self.answers) == {"200"}, f"the valid client got {dict(self.answers)}"
        assert self.answers["200"] >= at_least, f"the valid client got only {dict(self.answers)}"
        assert self.acked <= receiver.journaled()[0]


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset), after reading any answer."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slowloris_headers_and_bodies_are_cut_off_and_valid_clients_served(receiver: Receiver, leaks: Leaks) -> None:
    leaks.file("relay log", receiver.relay.log_path)
    head = (f"POST /v1/entries HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {RECEIVER_TOKEN}\r\n"
            "Content-Type: application/json\r\nX-Padding: " + "p" * 200 + "\r\n").encode()
    body_head = (f"POST /v1/entries HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {RECEIVER_TOKEN}\r\n"
                 f"WorkOS-Signature: {signature(b'x')}\r\nContent-Length: 100000\r\n\r\n").encode()
    header_trickle = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(300)]
    body_trickle = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(100)]
    for sock in body_trickle:
        sock.sendall(body_head)
    try:
        with ValidClient(receiver.url, "slowloris") as valid:
            deadline = time.monotonic() + 45
            sent = 0
            open_ = list(header_trickle + body_trickle)
            while open_ and time.monotonic() < deadline:
                for sock in list(open_):  # one byte per connection per round, for as long as it is open
                    try:
                        sock.sendall(head[sent:sent + 1] if sock in header_trickle else b"[")
                    except OSError:
                        open_.remove(sock)
                        continue
                    if _closed_by_server(sock):
                        open_.remove(sock)
                sent = min(sent + 1, len(head) - 1)
                time.sleep(0.2)  # the attacker's pace
        assert not open_, f"{len(open_)} slow connections were still open after 45 s (keep_alive is 15 s)"
        valid.check(receiver)
    finally:
        for sock in header_trickle + body_trickle:
            sock.close()


@pytest.mark.parametrize("request_head", [
    b"POST /v1/entries HTTP/1.1\r\nHost: relay\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n",
    b"POST /v1/entries HTTP/1.1\r\nHost: relay\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n",
    b"POST /" + b"a" * 100 * 1024 + b" HTTP/1.1\r\nHost: relay\r\n\r\n",
    b"POST /v1/entries HTTP/1.1\r\nHost: relay\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"POST /v1/entries HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\n",
], ids=["one-64KiB-header", "5000-headers", "100KiB-request-line", "absurd-content-length", "absurd-chunk"])
def test_oversized_heads_are_refused_without_harm(receiver: Receiver, leaks: Leaks, request_head: bytes) -> None:
    leaks.file("relay log", receiver.relay.log_path)
    with ValidClient(receiver.url, f"oversized-{hashlib.sha1(request_head).hexdigest()[:6]}") as valid:
        answers = []
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(request_head)
                    sock.shutdown(socket.SHUT_WR)
                reply = b""
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(65536):
                        reply += chunk
                answers.append(reply.split(b"\r\n", 1)[0])
        wait_until_sync(lambda: valid.answers["200"] >= 3, 30, "the valid client to be served")
    refused = Counter(answers)
    assert not any(a.startswith((b"HTTP/1.1 200", b"HTTP/1.1 5")) for a in refused), refused
    assert set(refused) <= {b"", b"HTTP/1.1 400 ", b"HTTP/1.1 401 ", b"HTTP/1.1 404 ", b"HTTP/1.1 413 ",
                            b"HTTP/1.1 431 "}, refused
    valid.check(receiver, at_least=3)


def test_ten_thousand_connections_held_do_not_starve_valid_clients(receiver: Receiver, leaks: Leaks) -> None:
    leaks.file("relay log", receiver.relay.log_path)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < HELD + 500:
        pytest.skip(f"the hard limit of open files ({hard}) is below {HELD + 500}")
    process = receiver.process
    before = receiver.rss()
    held: list[socket.socket] = []
    with soft_open_files_limit(HELD + 500 if hard == resource.RLIM_INFINITY else hard):
        try:
            for i in range(HELD):
                try:
                    held.append(socket.create_connection(("127.0.0.1", receiver.port), timeout=5))
                except OSError as exc:
                    raise AssertionError(f"connection {i + 1} of {HELD} could not be opened: {exc}") from None
            wait_until_sync(lambda: process.num_fds() >= HELD, 30, f"the relay to accept all {HELD} connections")
            with ValidClient(receiver.url, "crowded") as valid:
                wait_until_sync(lambda: valid.answers.total() >= 5, 60, "five requests of the valid client")
            peak = receiver.rss()
        finally:
            for sock in held:
                sock.close()
        wait_until_sync(lambda: process.num_fds() < 200, 60, "the relay to let the held connections go")
    after = receiver.rss()
    print(f"\nhostile: RSS {before / MiB:.0f} MiB before, {peak / MiB:.0f} MiB with {HELD} connections held, "
          f"{after / MiB:.0f} MiB after; the valid client's slowest request took {valid.slowest:.2f} s")
    valid.check(receiver)
    assert peak - before < 1024 * MiB, "more than ~100 KiB per held connection"
    assert after - before < 512 * MiB


def test_forged_signatures_at_a_high_rate_store_nothing(receiver: Receiver, leaks: Leaks) -> None:
    leaks.file("relay log", receiver.relay.log_path)
    ids_before, quarantined_before = receiver.journaled()
    answers: Counter[int | str] = Counter()
    lock = threading.Lock()
    body = json.dumps([numbered("forged", i) for i in range(20)]).encode()
    forgeries: list[dict[str, Any]] = [
        {"authorization": f"Bearer {RECEIVER_TOKEN}", "workos-signature": signature(body, secret="guessed")},
        {"authorization": f"Bearer {RECEIVER_TOKEN}", "workos-signature": signature(body, at=time.time() - 3600)},
        {"authorization": f"Bearer {RECEIVER_TOKEN}", "workos-signature": "t=1, v1=" + "0" * 64},
        {"authorization": f"Bearer {RECEIVER_TOKEN}", "workos-signature": "garbage"},
        {"authorization": "Bearer not-the-token", "workos-signature": signature(body)},
        {"workos-signature": signature(body)},
    ]

    def attacker(n: int) -> None:
        with httpx.Client(timeout=20.0) as client:
            for i in range(250):
                headers = {"content-type": "application/json", **forgeries[(n + i) % len(forgeries)]}
                try:
                    status: int | str = client.post(receiver.url, content=body, headers=headers).status_code
                except httpx.TransportError:  # refused before its body was read, the connection is closed
                    status = "disconnected"
                with lock:
                    answers[status] += 1

    with ValidClient(receiver.url, "under-attack") as valid:
        threads = [threading.Thread(target=attacker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert sum(answers.values()) == 2000
    assert set(answers) <= {401, 403, "disconnected"} and answers[401] and answers[403], answers
    valid.check(receiver)
    ids_after, quarantined_after = receiver.journaled()
    assert not any(i.startswith("forged-") for i in ids_after), "a forged request was stored"
    assert quarantined_after == quarantined_before
    assert ids_after - ids_before == valid.acked
    failures = [e for e in receiver.relay.events() if e.get("event") == "http_auth_failed"]
    assert 1 <= len(failures) <= 10, "auth failures are logged, throttled"
