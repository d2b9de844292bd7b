"""Every destination type's peer at once, for the suite's end-to-end tests, and what each one received.

The peers are the ones the destinations' own tests use: the fake Splunk HEC (`tests/fakes/hec.py`), moto's
S3 server with SigV4 checked (`tests/moto_s3.py`), a real syslog-ng (`tests/syslog_receiver.py`) and the
webhook receiver that verifies signatures with the `standardwebhooks` package (`tests/webhook_receiver.py`).
The HTTP ones sit behind a `FaultProxy` each, so a test can refuse, fail or hang any one of them; syslog-ng
is stopped, replaced or frozen (SIGSTOP) instead. Every credential is one of the recognisable values in
`leaks.py`, handed to the relay through the environment.
"""

from __future__ import annotations

import gzip
import json
import signal
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.fakes.hec import FakeHec, Token, serve
from tests.fault_proxy import FaultProxy, http_answer, s3_error
from tests.moto_s3 import MotoS3
from tests.reliability.leaks import (
    ENV,
    HEC_TOKEN,
    WEBHOOK_BEARER,
    WEBHOOK_HEADER,
    WEBHOOK_SIGNING,
    Leaks,
)
from tests.syslog_receiver import SYSLOG_NG, SyslogNg
from tests.webhook_receiver import Receiver, start_receiver

DESTINATIONS = ("hec", "s3", "webhook", "syslog")
BUSY = {
    "hec": http_answer(503, "Service Unavailable", b'{"text":"Server is busy","code":9}'),
    "s3": s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "webhook": http_answer(503, "Service Unavailable", b'{"error": "maintenance"}'),
}
"""What each HTTP peer answers while it is overloaded."""


@dataclass
class Peers:
    hec: FakeHec
    receiver: Receiver
    moto: MotoS3
    bucket: str
    syslog: SyslogNg
    proxies: dict[str, FaultProxy]
    _resetter: _Resetter | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {**ENV, "S3_KEY_ID": self.moto.relay.id, "S3_SECRET": self.moto.relay.secret}

    def destinations(self, *, batch: int = 200, send_timeout: str = "2s") -> dict[str, dict[str, Any]]:
        """A configuration block for each destination type, tuned to recover within a second or so."""
        common = {"retry": {"initial_backoff": "50ms", "max_backoff": "500ms"}, "send_timeout": send_timeout,
                  "batch": {"max_entries": batch, "max_wait": "50ms"}}
        return {
            "hec": {"type": "splunk_hec", "url": self.proxies["hec"].url, "token": "${HEC_TOKEN}",
                    "timeout": "1s", **common},
            "s3": {"type": "s3", "bucket": self.bucket, "endpoint_url": self.proxies["s3"].url, "region": "us-east-1",
                   "access_key_id": "${S3_KEY_ID}", "secret_access_key": "${S3_SECRET}", **common},
            "webhook": {"type": "webhook", "url": f"{self.proxies['webhook'].url}/audit", "encoding": "ndjson",
                        "auth": {"bearer_token": "${WEBHOOK_TOKEN}"}, "headers": {"X-Api-Key": "${WEBHOOK_API_KEY}"},
                        "signing_secrets": ["${WEBHOOK_SIGNING_SECRET}"], "timeout": "1s", **common},
            "syslog": {"type": "syslog", "host": "127.0.0.1", "port": self.syslog.ports["tcp"],
                       "hostname": "relay.test", "timeout": "1s", "confirm_after": "100ms", **common},
        }

    # -- what arrived -------------------------------------------------------------------------------------

    def arrived(self) -> dict[str, Counter[str]]:
        """Entry id -> how many times it arrived, per destination (webhook: after the receiver's dedupe by
        webhook-id). Blocking (reads moto and syslog-ng's file): call it in a thread from async code."""
        hec = Counter(e.event["id"] for e in self.hec.events)
        s3: Counter[str] = Counter()
        for body in self.moto.objects(self.bucket).values():
            s3.update(json.loads(line)["id"] for line in gzip.decompress(body).splitlines())
        webhook = Counter(e["id"] for e in self.receiver.processed_entries())
        syslog = Counter(json.loads(m["msg"])["id"] for m in self.syslog.received())
        return {"hec": hec, "s3": s3, "webhook": webhook, "syslog": syslog}

    # -- outages ------------------------------------------------------------------------------------------

    async def down(self, name: str, how: str) -> None:
        """Make one peer `refused` (nothing listens), `busy` (503, or for syslog: every connection reset)
        or `hanging` (connections accepted, nothing answered, or for syslog: the process frozen)."""
        if name == "syslog":
            await self._syslog_down(how)
            return
        proxy = self.proxies[name]
        proxy.resume()
        if how == "refused":
            proxy.refuse()
        elif how == "busy":
            proxy.fail_response, proxy.fail_count, proxy.mode = BUSY[name], 10**9, "fail"
        else:
            proxy.mode = "stall"

    async def up(self, name: str) -> None:
        if name == "syslog":
            await self._syslog_down(None)
            return
        proxy = self.proxies[name]
        proxy.mode, proxy.fail_count = "forward", 0
        proxy.resume()

    async def _syslog_down(self, how: str | None) -> None:
        """Going from one state to the next: frozen syslog-ng is thawed, the resetting listener closed,
        syslog-ng stopped or started as the new state needs."""
        proc = self.syslog.proc
        running = proc is not None and proc.returncode is None
        if running and proc is not None:
            proc.send_signal(signal.SIGCONT)
        if self._resetter is not None:
            self._resetter.close()
            self._resetter = None
        if how == "hanging":
            if not running:
                await self.syslog.start()
            assert self.syslog.proc is not None
            self.syslog.proc.send_signal(signal.SIGSTOP)
        elif how in ("refused", "busy"):
            if running:
                await self.syslog.stop()
            if how == "busy":
                self._resetter = _Resetter(self.syslog.ports["tcp"])
        elif not running:
            await self.syslog.start()


class _Resetter:
    """A listener that accepts every connection and resets it at once (RST): a receiver that is up but
    refuses to take anything, the closest syslog has to an HTTP 503."""

    def __init__(self, port: int) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._run, name="syslog-resetter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()

    def close(self) -> None:
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)


@asynccontextmanager
async def open_peers(nursery: trio.Nursery, tmp_path: Path, moto: MotoS3, leaks: Leaks) -> AsyncIterator[Peers]:
    """Start all four peers (HTTP ones behind fault proxies); stop them all at the end."""
    if SYSLOG_NG is None:
        pytest.skip("syslog-ng is not installed (Debian: apt-get install syslog-ng-core; CI installs it)")
    leaks.secret(moto.relay.secret)
    leaks.secret(moto.relay.id)
    hec = FakeHec([Token(HEC_TOKEN)])
    await nursery.start(serve, hec)
    receiver = await start_receiver(nursery)
    receiver.verifiers = {"relay": WEBHOOK_SIGNING}
    receiver.expect_authorization = f"Bearer {WEBHOOK_BEARER}"
    syslog = SyslogNg(tmp_path / "syslog-ng")
    await syslog.start()
    bucket = await trio.to_thread.run_sync(moto.new_bucket)
    proxies = {
        "hec": FaultProxy(("127.0.0.1", int(hec.url.rsplit(":", 1)[1])), methods=frozenset({"POST"})).start(),
        "s3": FaultProxy(("127.0.0.1", moto.port), methods=frozenset({"PUT"})).start(),
        "webhook": FaultProxy(("127.0.0.1", int(receiver.url.rsplit(":", 1)[1])), methods=frozenset({"POST"})).start(),
    }
    peers = Peers(hec, receiver, moto, bucket, syslog, proxies)
    try:
        yield peers
    finally:
        with trio.CancelScope(shield=True):
            for proxy in proxies.values():
                proxy.stop()
            if syslog.proc is not None and syslog.proc.returncode is None:
                syslog.proc.send_signal(signal.SIGCONT)
            if peers._resetter is not None:
                peers._resetter.close()
            await syslog.stop()
            leaks.file("syslog-ng's own log", syslog.workdir / "syslog-ng.log")


def missing_and_duplicates(arrived: dict[str, Counter[str]], expected: set[str]) -> dict[str, tuple[int, int]]:
    """Per destination: (expected ids that never arrived, extra copies of ids that arrived twice or more)."""
    return {name: (len(expected - set(ids)), sum(n - 1 for n in ids.values() if n > 1))
            for name, ids in arrived.items()}


def webhook_header_check(receiver: Receiver) -> None:
    """Every request the receiver processed carried the custom header (a credential) unchanged."""
    for request in receiver.deliveries():
        if request.status == 200:
            assert request.headers.get("x-api-key") == WEBHOOK_HEADER
