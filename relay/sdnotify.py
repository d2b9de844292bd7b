"""The systemd notification protocol (sd_notify): one datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET`.

A few lines over an AF_UNIX datagram socket, so there is no dependency on libsystemd. Without
`$NOTIFY_SOCKET` (not started by systemd, or `Type=simple`) every call is a no-op. Abstract socket
addresses (`@name`) are supported. Log events: `sd_notify_failed` (warning, once per kind of failure).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

__all__ = ["Notifier"]

log = structlog.get_logger("relay.sdnotify")
SEND_TIMEOUT = 2.0
"""A local datagram send does not block in practice; this bounds the pathological case."""


class Notifier:
    """Sends state changes to the service manager. `Notifier(None)` is a silent one."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address if address and address[0] in "@/" else None
        self.watchdog_usec = watchdog_usec
        self._failed: set[str] = set()

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """`$NOTIFY_SOCKET`, and `$WATCHDOG_USEC` when it is meant for this process (`$WATCHDOG_PID`)."""
        env = os.environ if env is None else env
        watchdog: int | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(env.get("NOTIFY_SOCKET"), watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between `WATCHDOG=1` pings: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *fields: str) -> bool:
        """Send `fields` (each `KEY=VALUE`) in one datagram; True if it was sent."""
        if self.address is None:
            return False
        address = "\0" + self.address[1:] if self.address[0] == "@" else self.address
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.connect(address)
                sock.sendall(message)
            return True
        except OSError as exc:
            kind = type(exc).__name__
            if kind not in self._failed:  # once per kind: a missing socket must not flood the log
                self._failed.add(kind)
                log.warning("sd_notify_failed", socket=self.address, error=f"{kind}: {exc}",
                            message=fields[0].split("=", 1)[0] if fields else "")
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload (systemd 253+) match this to its reload request.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                           "STATUS=reloading the configuration")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping: finishing batches in flight")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def extend_start(self, seconds: float, status: str) -> bool:
        """Ask for `seconds` more before the start timeout (`TimeoutStartSec=`) expires (systemd 236+)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")
