"""sd_notify: the datagram protocol, the watchdog's definition of alive, and the message sequence a real
relay process sends to a socket standing in for systemd."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from relay.heartbeat import Heartbeat, RateWindow, while_starting
from relay.sdnotify import Notifier
from tests.helpers import RelayProcess, config_dict, write_config


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_notify_sends_one_datagram_of_lines(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier(path)
    assert notifier.ready("3 sources up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 sources up"
    assert notifier.status("two\nlines")
    assert sock.recv(4096) == b"STATUS=two lines", "a value cannot break the protocol with a newline"


def test_abstract_socket_address() -> None:
    name = f"audit-relay-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert Notifier(f"@{name}").stopping()
        assert sock.recv(4096).split(b"\n")[0] == b"STOPPING=1"


def test_without_systemd_everything_is_a_no_op(tmp_path: Path) -> None:
    assert not Notifier(None).ready("x")
    assert not Notifier("relative/path").enabled
    with capture_logs() as logs:
        notifier = Notifier(str(tmp_path / "missing.sock"))
        assert not notifier.watchdog() and not notifier.watchdog()
    assert [e["event"] for e in logs] == ["sd_notify_failed"], "a missing socket is reported once, not per ping"


def test_watchdog_settings_come_from_the_environment() -> None:
    me = str(os.getpid())
    assert Notifier.from_environment({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15
    assert Notifier.from_environment({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}).watchdog_interval == 15
    assert Notifier.from_environment({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None, \
        "WATCHDOG_PID names another process (a parent that exec'd us)"
    assert Notifier.from_environment({"WATCHDOG_USEC": "0"}).watchdog_interval is None


class Recorder(Notifier):
    def __init__(self, watchdog_usec: int | None) -> None:
        super().__init__("/dev/null", watchdog_usec)
        self.sent: list[tuple[float, str]] = []

    def notify(self, *fields: str) -> bool:
        self.sent.append((trio.current_time(), "\n".join(fields)))
        return True


async def test_watchdog_pings_only_while_the_journal_answers(autojump_clock: trio.testing.MockClock) -> None:
    """10 s timeout: a ping every 5 s. The probe answers last at t=15 and hangs from t=20 to t=62: pings
    stop once that answer is older than the timeout, and resume once it answers again."""
    notifier = Recorder(watchdog_usec=10_000_000)
    hung = trio.Event()
    released = trio.Event()

    async def probe() -> None:
        if trio.current_time() >= 20 and not released.is_set():
            hung.set()
            await released.wait()

    heartbeat = Heartbeat(notifier, probe, lambda: "fine", status_interval=60)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(heartbeat.run)
            await hung.wait()
            await trio.sleep(42)
            released.set()
            await trio.sleep(11)
            nursery.cancel_scope.cancel()
    pings = [round(t) for t, message in notifier.sent if message == "WATCHDOG=1"]
    assert pings == [0, 5, 10, 15, 20, 25, 65, 70], "withheld from 30 to 60, while the journal hung"
    assert [e["event"] for e in logs] == ["watchdog_withheld", "watchdog_resumed"]
    assert [m for _, m in notifier.sent if m.startswith("STATUS=")] == ["STATUS=fine"] * 2


async def test_no_watchdog_without_watchdog_usec(autojump_clock: trio.testing.MockClock) -> None:
    notifier = Recorder(watchdog_usec=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(Heartbeat(notifier, trio.sleep_forever, lambda: "s", status_interval=10).run)
        await trio.sleep(25)
        nursery.cancel_scope.cancel()
    assert [m for _, m in notifier.sent] == ["STATUS=s"] * 3


async def test_a_long_step_of_the_start_keeps_extending_the_start_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    """A journal migration can take minutes; systemd must not kill the start meanwhile (TimeoutStartSec)."""
    notifier = Recorder(watchdog_usec=None)
    await while_starting(notifier, partial(trio.sleep, 35), "opening the journal")
    assert [(round(t), m) for t, m in notifier.sent] == [
        (t, "EXTEND_TIMEOUT_USEC=30000000\nSTATUS=opening the journal") for t in (10, 20, 30)]
    quick = Recorder(watchdog_usec=None)
    await while_starting(quick, partial(trio.sleep, 1), "opening the journal")
    assert quick.sent == [], "a start that is quick says nothing"


def test_rate_window() -> None:
    rate = RateWindow(window=60)
    for t in range(0, 130, 10):
        rate.add(t, t * 5)  # 5 entries/s
    assert rate.per_minute() == 300


class Systemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, split into lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: list[list[str]] = []

    def until(self, line: str) -> list[str]:
        """Receive up to the first datagram containing `line`; return it."""
        while True:
            message = self.sock.recv(4096).decode().split("\n")
            self.messages.append(message)
            if line in message:
                return message


def test_message_sequence_of_a_relay_process(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    systemd = Systemd(sock)
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, {"demo": {"type": "demo", "rate": 50}}, {"out": {"type": "file", "path": str(tmp_path / "o")}}))
    relay = RelayProcess(config, tmp_path / "relay.log", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    try:
        relay.start(wait_ready=False)
        ready = systemd.until("READY=1")
        assert any(e.get("event") == "relay_ready" for e in relay.events()), "READY=1 once the relay is ready"
        assert ready[0] == "READY=1" and ready[1].startswith("STATUS=")
        # The destination opens beside the sources (a destination whose peer is down must not hold READY
        # back), so at READY it may still be opening: "0/1 destinations up (down: out starting)".
        assert re.search(r" [01]/1 destinations up.*journal \d+% full$", ready[1]), ready[1]
        systemd.until("WATCHDOG=1")

        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGHUP)
        systemd.until("RELOADING=1")
        systemd.until("READY=1")
        assert any(e.get("event") == "reload_applied" for e in relay.events()), "READY=1 after the reload"

        relay.proc.send_signal(signal.SIGTERM)
        systemd.until("STOPPING=1")
        assert relay.proc.wait(timeout=60) == 0
    finally:
        relay.stop_quietly()
    states = [m[0] for m in systemd.messages if m[0] in ("READY=1", "RELOADING=1", "STOPPING=1")]
    assert states == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    reloading = next(m for m in systemd.messages if m[0] == "RELOADING=1")
    assert reloading[1].startswith("MONOTONIC_USEC=") and reloading[1][15:].isdigit()
