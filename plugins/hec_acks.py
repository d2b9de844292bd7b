"""Splunk HEC indexer acknowledgement: the pending ack ids of one channel, polled together.

Each `send()` that got an `ackId` waits here. There is no background task: whichever waiting `send()`
currently *leads* polls `/services/collector/ack` once per interval with every pending id of the channel
(one request for all of them) and wakes the ones confirmed; when it finishes (its own id confirmed, timed
out, cancelled) another waiter takes over the same schedule. So polling happens exactly while someone
waits, inside the delivery loop's own tasks, and stops with them.

Splunk reports `true` for an id only once and then forgets it: the answer is applied to every waiter
before anything else can run, and the poll request itself is shielded from cancellation (bounded by its
own timeout) so a leader cancelled mid-poll cannot throw away confirmations meant for the others.

Log events: `hec_ack_poll_failed` (warning; waiters keep waiting until `ack_timeout`),
`hec_ack_id_reused` (warning; Splunk restarted and counts ids from 0 again: the older batch is resent),
`hec_ack_after_giving_up` (info; a batch already scheduled for resending was confirmed after all).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

import relay

__all__ = ["AckTracker", "PollAnswer"]

PollAnswer = dict[int, bool] | relay.Halted | relay.RetryLater
"""Per-id status, or why the poll failed (`Halted`: every waiter fails now; `RetryLater`: keep waiting)."""


@dataclass(eq=False)
class _Waiter:
    ack_id: int
    wake: trio.Event = field(default_factory=trio.Event)
    acked: bool = False
    failure: relay.Halted | relay.RetryLater | None = None

    @property
    def settled(self) -> bool:
        return self.acked or self.failure is not None


class AckTracker:
    def __init__(self, poll: Callable[[list[int]], Awaitable[PollAnswer]], *, interval: float, timeout: float,
                 log: Any, pending_gauge: Any, wait_histogram: Any) -> None:
        self._poll = poll
        self.interval = interval
        self.timeout = timeout
        self._log = log
        self._gauge = pending_gauge
        self._histogram = wait_histogram
        self._pending: dict[int, _Waiter] = {}
        self._leading = False
        self._next_poll = 0.0

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def wait(self, ack_id: int) -> relay.Result:
        """Wait until Splunk confirms `ack_id`: `Delivered`, or `RetryLater` after `timeout`, or `Halted`."""
        stale = self._pending.pop(ack_id, None)
        if stale is not None:
            self._log.warning("hec_ack_id_reused", ack_id=ack_id,
                              hint="Splunk forgot the channel (restarted?); the older batch is sent again")
            stale.failure = relay.RetryLater(f"Splunk issued ack id {ack_id} again before confirming it "
                                             "(HEC restarted?); sending the batch again")
            stale.wake.set()
        if not self._pending:
            self._next_poll = max(self._next_poll, trio.current_time() + self.interval)
        waiter = _Waiter(ack_id)
        self._pending[ack_id] = waiter
        self._gauge.set(len(self._pending))
        started = time.perf_counter()
        try:
            with trio.move_on_after(self.timeout):
                while not waiter.settled:
                    if self._leading:
                        await waiter.wake.wait()
                        waiter.wake = trio.Event()
                    else:
                        await self._lead(waiter)
        finally:
            if self._pending.get(ack_id) is waiter:
                del self._pending[ack_id]
            self._gauge.set(len(self._pending))
        if waiter.acked:
            self._histogram.observe(time.perf_counter() - started)
            return relay.Delivered()
        if waiter.failure is not None:
            return waiter.failure
        return relay.RetryLater(f"Splunk did not confirm indexing (ack id {ack_id}) within ack_timeout "
                                f"({self.timeout:g}s); sending the batch again")

    async def _lead(self, waiter: _Waiter) -> None:
        self._leading = True
        try:
            while not waiter.settled:
                await trio.sleep_until(self._next_poll)
                ids = sorted(self._pending)
                self._next_poll = trio.current_time() + self.interval
                with trio.CancelScope(shield=True):
                    answer = await self._poll(ids)
                self._apply(ids, answer)
        finally:
            self._leading = False
            for other in self._pending.values():
                other.wake.set()

    def _apply(self, ids: list[int], answer: PollAnswer) -> None:
        if isinstance(answer, relay.RetryLater):
            self._log.warning("hec_ack_poll_failed", pending=len(ids), reason=answer.reason,
                              hint=f"still waiting; batches not confirmed within {self.timeout:g}s are resent")
            return
        for ack_id in ids:
            waiter = self._pending.get(ack_id)
            if isinstance(answer, relay.Halted):
                if waiter is not None:
                    waiter.failure = answer
                    waiter.wake.set()
            elif answer.get(ack_id):
                if waiter is None:
                    self._log.info("hec_ack_after_giving_up", ack_id=ack_id,
                                   hint="that batch is being resent, so Splunk will hold it twice")
                else:
                    waiter.acked = True
                    waiter.wake.set()
