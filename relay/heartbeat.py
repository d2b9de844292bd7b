"""Telling systemd the relay is alive (`WATCHDOG=1`) and what it is doing (`STATUS=`).

What "alive" means here, on purpose:

* the event loop is responsive: the ping comes from an ordinary task, so a blocked loop sends nothing;
* the journal writer answers: a probe task sends a no-op write through the writer's group commit every
  half watchdog period. Its answer proves the writer task is running, its worker thread is not stuck and
  SQLite can still begin and commit a transaction on the disk. `WATCHDOG=1` is sent only while the last
  answer is younger than the watchdog timeout.

Destinations and sources are deliberately not part of it: a Splunk outage or a revoked token is normal
weather, retried and visible in metrics, and restarting the process would not fix it. A wedged journal
(hung disk, deadlocked writer) is exactly what a restart is for: without the probe's answer systemd
stops receiving pings and restarts the service (`Restart=on-failure`).

Log events: `watchdog_withheld` (error: the journal has not answered), `watchdog_resumed`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import structlog
import trio

from relay.sdnotify import Notifier

__all__ = ["STATUS_INTERVAL", "Heartbeat", "RateWindow", "while_starting"]

log = structlog.get_logger("relay.heartbeat")
STATUS_INTERVAL = 10.0
START_EXTENSION = 30.0
"""While a step of the start runs long, systemd is asked for this much more time every `STATUS_INTERVAL`."""


async def while_starting(notifier: Notifier, step: Callable[[], Awaitable[None]], status: str) -> None:
    """Run `step` of the start; while it takes long (a journal migration rewrites every entry once, ~20 s
    per million), keep systemd's start timeout from expiring and say why in the status."""
    async with trio.open_nursery() as nursery:
        async def extend() -> None:
            while True:
                await trio.sleep(STATUS_INTERVAL)
                notifier.extend_start(START_EXTENSION, status)

        nursery.start_soon(extend)
        await step()
        nursery.cancel_scope.cancel()


class RateWindow:
    """Events per minute over the last minute, from samples of an increasing count."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, count: int) -> None:
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def per_minute(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) * 60.0 / (t1 - t0) if t1 > t0 else 0.0


class Heartbeat:
    def __init__(self, notifier: Notifier, probe: Callable[[], Awaitable[object]], summary: Callable[[], str],
                 status_interval: float = STATUS_INTERVAL) -> None:
        self.notifier = notifier
        self.probe = probe
        self.summary = summary
        self.status_interval = status_interval
        self.answered_at: float | None = None
        self.withheld = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        interval = self.notifier.watchdog_interval
        async with trio.open_nursery() as nursery:
            if interval is not None:
                await self._probe_once()
                nursery.start_soon(self._probe_loop, interval)
                nursery.start_soon(self._watchdog_loop, interval)
            nursery.start_soon(self._status_loop)
            task_status.started()

    async def _probe_once(self) -> None:
        await self.probe()
        self.answered_at = trio.current_time()

    async def _probe_loop(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            await self._probe_once()

    def alive(self, interval: float) -> bool:
        """True while the journal answered within the watchdog timeout (two ping intervals)."""
        return self.answered_at is not None and trio.current_time() - self.answered_at <= 2 * interval

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            if self.alive(interval):
                self.notifier.watchdog()
                if self.withheld:
                    self.withheld = False
                    log.info("watchdog_resumed")
            elif not self.withheld:
                self.withheld = True
                silent = trio.current_time() - (self.answered_at or 0.0)
                log.error("watchdog_withheld", journal_silent_for=round(silent, 1),
                          hint="the journal writer is not answering; systemd will restart the relay")
            await trio.sleep(interval)

    async def _status_loop(self) -> None:
        while True:
            self.notifier.status(self.summary())
            await trio.sleep(self.status_interval)
