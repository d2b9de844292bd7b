"""A one-line progress display for long commands (`relay replay`, `relay import`): done, rate, ETA.

Drawn on stderr, and only when stderr is a terminal: piped or redirected output (cron, CI, `| tee`) gets
no control characters, just whatever the command prints at the end.

    with Progress(total, unit="entries") as progress:
        for chunk in work:
            ...
            progress.update(done)
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_duration"]

RATE_WINDOW = 10.0
"""Seconds of history the rate (and so the ETA) is computed over: recent speed, not the average."""


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    def __init__(self, total: int | None, *, unit: str = "entries", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, min_interval: float = 0.2) -> None:
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.clock = clock
        self.min_interval = min_interval
        self.done = 0
        self._started = clock()
        self._drawn_at: float | None = None
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])
        self._width = 0

    def update(self, done: int) -> None:
        now = self.clock()
        self.done = done
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        if self.enabled and (self._drawn_at is None or now - self._drawn_at >= self.min_interval):
            self._draw(now)

    def rate(self) -> float:
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def render(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        rate = self.rate()
        if self.total:
            text = f"{self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text = f"{self.done:,} {self.unit}"
        text += f"  {rate:,.0f}/s"
        if self.total and self.done < self.total:
            text += f"  ETA {format_duration((self.total - self.done) / rate)}" if rate > 0 else "  ETA -"
        else:
            text += f"  in {format_duration(now - self._started)}"
        return text

    def _draw(self, now: float) -> None:
        text = self.render(now)
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)
        self._drawn_at = now

    def finish(self) -> None:
        """Draw the final state and end the line (on a terminal)."""
        if self.enabled:
            self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
