"""Exponential backoff with full jitter, and reading a server's Retry-After."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

__all__ = ["Backoff", "parse_retry_after"]


class Backoff:
    """Delays for successive failures: uniform in [0, min(max, initial * 2**n)] ("full jitter").

    Full jitter spreads out clients that failed together (AWS Architecture Blog, "Exponential Backoff
    And Jitter"). A server-given delay wins when it asks for longer, capped at `maximum`.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self, server_delay: float | None = None) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(self.failures, 32)))
        self.failures += 1
        delay = self._rng.uniform(0, ceiling)
        if server_delay is not None:
            delay = max(delay, min(server_delay, self.maximum))
        return delay

    def reset(self) -> None:
        self.failures = 0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
