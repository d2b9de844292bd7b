"""A real syslog-ng as the receiver for the `syslog` destination's tests and benchmark.

Runs in the foreground with a configuration written to a work folder, on free 127.0.0.1 ports, and is
stopped by its PID. Every message it receives becomes one JSON line in `received.jsonl` (format-json
escapes line feeds, so each line parses), with the raw message, its parsed fields and which port it came in
on. The set-up follows the tested receiver in shared/reference/protocols.md, section 5.3.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tests.helpers import free_port, free_ports

SYSLOG_NG = shutil.which("syslog-ng") or next(
    (p for p in ("/usr/sbin/syslog-ng", "/sbin/syslog-ng") if Path(p).exists()), None)

TEMPLATE = ("$(format-json --pair src=${SOURCE} --pair pri=${PRI} --pair ts=${ISODATE} --pair host=${HOST} "
            "--pair app=${PROGRAM} --pair procid=${PID} --pair msgid=${MSGID} --pair msg=${MSG} "
            "--pair raw=${RAWMSG} --scope sdata)\\n")


class PortTaken(RuntimeError):
    """syslog-ng could not bind one of its ports: something else took it after it was chosen."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    """When set, a second TLS port requires a client certificate signed by this CA."""


class SyslogNg:
    """One syslog-ng process with four sources: octet-counted TCP, LF-framed TCP, UDP and (optionally) TLS."""

    def __init__(self, workdir: Path, tls: TlsFiles | None = None, raw_only: bool = False) -> None:
        """`raw_only` writes just `${RAWMSG}` per message: cheaper, for benchmarks (`lines()` counts them)."""
        assert SYSLOG_NG is not None, "syslog-ng is not installed"
        self.workdir = workdir
        self.template = "${RAWMSG}\\n" if raw_only else TEMPLATE
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.output = workdir / "received.jsonl"
        self.config = workdir / "syslog-ng.conf"
        self.ports: dict[str, int] = {}
        self._choose_ports()
        self.proc: trio.Process | None = None
        self._started = False

    def _choose_ports(self) -> None:
        """Pick the ports (all different) and write the configuration that listens on them."""
        names = ["tcp", "lf"]
        if self.tls is not None:
            names += ["tls"] if self.tls.client_ca is None else ["tls", "mtls"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.ports["udp"] = free_port(socket.SOCK_DGRAM)
        self.config.write_text(self._config_text())

    def _config_text(self) -> str:
        ip = 'ip("127.0.0.1")'
        sources = [
            f'source s_tcp {{ syslog({ip} port({self.ports["tcp"]}) transport("tcp") flags(store-raw-message)); }};',
            f'source s_lf {{ network({ip} port({self.ports["lf"]}) transport("tcp") '
            f'flags(syslog-protocol, store-raw-message)); }};',
            f'source s_udp {{ syslog({ip} port({self.ports["udp"]}) transport("udp") flags(store-raw-message)); }};',
        ]
        if self.tls is not None:
            keys = f'key-file("{self.tls.key}") cert-file("{self.tls.cert}")'
            sources.append(f'source s_tls {{ syslog({ip} port({self.ports["tls"]}) transport("tls") '
                           f'tls({keys} peer-verify(optional-untrusted)) flags(store-raw-message)); }};')
            if self.tls.client_ca is not None:
                sources.append(f'source s_mtls {{ syslog({ip} port({self.ports["mtls"]}) transport("tls") '
                               f'tls({keys} ca-file("{self.tls.client_ca}") peer-verify(required-trusted)) '
                               f'flags(store-raw-message)); }};')
        names = " ".join(f"source({line.split()[1]});" for line in sources)
        return "\n".join([
            "@version: 3.38",
            # flow-control: syslog-ng stops reading rather than dropping when its file queue is full.
            'options { keep-hostname(yes); chain-hostnames(no); use-dns(no); flush-lines(0); stats-freq(0); '
            'frac-digits(6); send-time-zone("+00:00"); log-fifo-size(100000); };',
            *sources,
            f'destination d_json {{ file("{self.output}" template("{self.template}")); }};',
            f"log {{ {names} destination(d_json); flags(flow-control); }};",
            "",
        ])

    async def start(self, deadline: float = 20.0, attempts: int = 3) -> None:
        """Start in the foreground and wait until syslog-ng has bound every port.

        A port chosen free can be taken by another process before syslog-ng binds it; syslog-ng then
        exits at once. The first start then tries again on new ports; a restart keeps its ports, which
        the relay under test is already configured with.
        """
        for attempt in range(1, attempts + 1):
            try:
                await self._start_once(deadline)
                self._started = True
                return
            except PortTaken:
                if self._started or attempt == attempts:
                    raise
                self._choose_ports()

    async def _start_once(self, deadline: float) -> None:
        assert self.proc is None or self.proc.returncode is not None, "already running"
        w = self.workdir
        logged_before = len(self.log_text())
        with open(w / "syslog-ng.log", "ab") as log:  # noqa: ASYNC230 - a local file, opened once
            self.proc = await trio.lowlevel.open_process(
                [str(SYSLOG_NG), "-F", "-f", str(self.config), "-R", str(w / "syslog-ng.persist"),
                 "-p", str(w / "syslog-ng.pid"), "-c", str(w / "syslog-ng.ctl"), "--no-caps", "-e"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        with trio.move_on_after(deadline):
            # An external process: nothing to await but its log. syslog-ng says it is starting up once
            # every source is bound. (Waiting for the ports to accept was not enough: a port somebody
            # else listens on accepts too, while syslog-ng is already exiting.)
            while "syslog-ng starting up" not in self.log_text()[logged_before:]:
                if self.proc.poll() is not None:
                    taken = "Address already in use" in self.log_text()[logged_before:]
                    error = PortTaken if taken else RuntimeError
                    raise error(f"syslog-ng exited with {self.proc.returncode}:\n{self.log_text()}")
                await trio.sleep(0.02)
            return
        await self.stop()
        raise RuntimeError(f"syslog-ng did not open its ports within {deadline}s:\n{self.log_text()}")

    async def stop(self, deadline: float = 20.0) -> None:
        """SIGTERM to the PID we started; syslog-ng writes out what it queued and exits."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(deadline):
            await proc.wait()
            return
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()

    def log_text(self) -> str:
        path = self.workdir / "syslog-ng.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def lines(self) -> int:
        """Messages written so far, when each is one line (`raw_only`, no line feeds in the messages)."""
        if not self.output.exists():
            return 0
        with open(self.output, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def received(self) -> list[dict[str, Any]]:
        """Every message written so far, parsed (a line still being written is left for the next call)."""
        if not self.output.exists():
            return []
        data = self.output.read_bytes()
        return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines()]

    async def wait_received(self, count: int, deadline: float = 30.0) -> list[dict[str, Any]]:
        """Poll the output file (written by another process) until it holds `count` messages."""
        with trio.move_on_after(deadline):
            while len(messages := self.received()) < count:  # noqa: ASYNC110 - another process writes it
                await trio.sleep(0.02)
            return messages
        raise AssertionError(f"syslog-ng received {len(self.received())} messages, expected {count}, "
                             f"within {deadline}s:\n{self.log_text()[-3000:]}")
