"""A client that pushes entries to the relay's receiver the way a careful sender does: every entry until
it is acknowledged with a 200, retrying whatever got anything else (503, a reset, no answer at all).
One `Pusher` may be used from several threads at once (httpx's client is thread-safe)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.helpers import entry
from tests.reliability.leaks import RECEIVER_TOKEN


def numbered(prefix: str, i: int, **extra: Any) -> dict[str, Any]:
    """Entry `i` of a run, identified by its `id`; a little padding makes it the size of a real one."""
    return entry("user.created" if i % 3 else "api_key.created", id=f"{prefix}-{i:06d}",
                 occurred_at=f"2024-05-14T{9 + i // 3600 % 10:02d}:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}000Z",
                 **extra)


@dataclass
class Pusher:
    url: str
    """The receiver's entries URL, e.g. http://127.0.0.1:8080/v1/entries."""
    token: str = RECEIVER_TOKEN
    timeout: float = 10.0
    acked: set[str] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)
    """How each request ended: the status code, or the kind of transport error."""

    stop: threading.Event = field(default_factory=threading.Event)
    """Set to make `push_until_acked` give up (the test is ending)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = httpx.Client(timeout=self.timeout, headers={"authorization": f"Bearer {self.token}"})

    def acked_ids(self) -> set[str]:
        """A copy of the acknowledged ids, safe to take while another thread pushes."""
        with self._lock:
            return set(self.acked)

    def close(self) -> None:
        self.client.close()

    def push(self, batch: list[dict[str, Any]]) -> int | None:
        """One attempt; the status code, or None if there was no answer. A 200 marks the batch acked."""
        try:
            response = self.client.post(self.url, json=batch)
        except httpx.TransportError as exc:
            with self._lock:
                self.answers[type(exc).__name__] += 1
            return None
        with self._lock:
            self.answers[str(response.status_code)] += 1
        if response.status_code == 200:
            body = response.json()
            assert body["accepted"] + body["duplicates"] == len(batch), body
            with self._lock:
                self.acked.update(e["id"] for e in batch)
        return response.status_code

    def push_until_acked(self, batch: list[dict[str, Any]], deadline: float = 120.0, pause: float = 0.05) -> int:
        """Retry `batch` until it gets a 200; returns the number of attempts."""
        give_up = time.monotonic() + deadline
        attempts = 0
        while True:
            attempts += 1
            if self.push(batch) == 200:
                return attempts
            if self.stop.is_set():
                raise AssertionError("stopped before the batch was acknowledged")
            if time.monotonic() > give_up:
                raise AssertionError(f"no 200 within {deadline}s; answers so far: {dict(self.answers)}")
            time.sleep(pause)
