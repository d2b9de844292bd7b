"""The indexer-acknowledgement tracker on virtual time: one shared poll, timeouts, once-only `true`."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
import trio

import relay
from relay_plugins.hec_acks import AckTracker, PollAnswer


class Splunk:
    """The ack side of a HEC channel: ids become indexed when told; `true` is reported once, then forgotten."""

    def __init__(self, latency: float = 0.0) -> None:
        self.indexed: set[int] = set()
        self.polls: list[list[int]] = []
        self.latency = latency
        self.failures: list[PollAnswer] = []

    async def poll(self, ids: list[int]) -> PollAnswer:
        self.polls.append(ids)
        if self.failures:
            return self.failures.pop(0)
        answer = {i: i in self.indexed for i in ids}
        self.indexed -= {i for i, ok in answer.items() if ok}  # reported once, then forgotten
        await trio.sleep(self.latency)  # the answer is on its way back
        return answer


class _Metric:
    def __init__(self) -> None:
        self.values: list[float] = []

    def set(self, value: float) -> None:
        self.values.append(value)

    def observe(self, value: float) -> None:
        self.values.append(value)


def tracker(splunk: Splunk, *, interval: float = 10.0, timeout: float = 300.0) -> AckTracker:
    return AckTracker(splunk.poll, interval=interval, timeout=timeout, log=structlog.get_logger("test"),
                      pending_gauge=_Metric(), wait_histogram=_Metric())


async def test_one_poll_per_interval_for_all_waiters(autojump_clock: Any) -> None:
    splunk = Splunk()
    acks = tracker(splunk)
    results: dict[int, relay.Result] = {}
    async with trio.open_nursery() as nursery:
        for ack_id in range(5):
            async def wait(ack_id: int = ack_id) -> None:
                results[ack_id] = await acks.wait(ack_id)
            nursery.start_soon(wait)
        await trio.sleep(15)  # one poll has happened, nothing indexed yet
        assert splunk.polls == [[0, 1, 2, 3, 4]] and results == {}
        splunk.indexed = {0, 1, 2, 3, 4}
    assert results == dict.fromkeys(range(5), relay.Delivered())
    assert splunk.polls == [[0, 1, 2, 3, 4]] * 2
    assert acks.pending == 0


async def test_unconfirmed_ack_times_out_for_a_resend(autojump_clock: Any) -> None:
    acks = tracker(Splunk(), timeout=60)
    start = trio.current_time()
    result = await acks.wait(7)
    assert isinstance(result, relay.RetryLater) and "ack id 7" in result.reason and "within ack_timeout (60s)" \
        in result.reason
    assert trio.current_time() - start == pytest.approx(60)


async def test_halted_poll_fails_every_waiter(autojump_clock: Any) -> None:
    splunk = Splunk()
    splunk.failures = [relay.Halted("polling acknowledgements: HEC code 14 (ACK is disabled), HTTP 400")]
    acks = tracker(splunk)
    results: list[relay.Result] = []
    async with trio.open_nursery() as nursery:
        for ack_id in range(3):
            nursery.start_soon(lambda ack_id=ack_id: _append(results, acks.wait(ack_id)))
    assert len(results) == 3 and len(splunk.polls) == 1
    assert all(isinstance(r, relay.Halted) and "code 14" in r.reason for r in results)


async def _append(results: list[relay.Result], waiting: Any) -> None:
    results.append(await waiting)


async def test_failed_poll_keeps_waiting(autojump_clock: Any) -> None:
    splunk = Splunk()
    splunk.failures = [relay.RetryLater("polling acknowledgements: HEC code 9 (Server is busy), HTTP 503")]
    splunk.indexed = {3}
    with structlog.testing.capture_logs() as events:
        acks = tracker(splunk)
        assert await acks.wait(3) == relay.Delivered()
    assert len(splunk.polls) == 2
    assert [e["event"] for e in events] == ["hec_ack_poll_failed"]


async def test_cancelled_leader_does_not_lose_confirmations_for_others(autojump_clock: Any) -> None:
    """The leader's own send is cancelled while its poll's answer is on the wire; Splunk has already
    forgotten the `true`s it sent, so the others only get them if the poll finishes anyway."""
    splunk = Splunk(latency=2.0)
    acks = tracker(splunk)
    splunk.indexed = {0, 1, 2}
    results: dict[int, relay.Result] = {}
    async with trio.open_nursery() as nursery:
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                results[0] = await acks.wait(0)

        nursery.start_soon(lead)
        await trio.sleep(1)
        for ack_id in (1, 2):
            nursery.start_soon(lambda ack_id=ack_id: _set(results, ack_id, acks.wait(ack_id)))
        await trio.sleep(10)  # the poll is now in flight (sent at t=10, answer due at t=12)
        assert splunk.polls == [[0, 1, 2]]
        leader.cancel()
    assert results[1] == results[2] == relay.Delivered()
    assert results.get(0) in (None, relay.Delivered()), "the leader's own answer arrived before it could be cut off"
    assert len(splunk.polls) == 1, "the others were confirmed by the leader's poll, not a new one"


async def _set(results: dict[int, relay.Result], key: int, waiting: Any) -> None:
    results[key] = await waiting


async def test_leadership_passes_on_when_the_leader_is_done(autojump_clock: Any) -> None:
    splunk = Splunk()
    acks = tracker(splunk)
    results: dict[int, relay.Result] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _set(results, 0, acks.wait(0)))
        await trio.sleep(1)
        nursery.start_soon(lambda: _set(results, 1, acks.wait(1)))
        splunk.indexed = {0}
        await trio.sleep(10)
        assert results == {0: relay.Delivered()}, "the leader (0) confirmed and left"
        splunk.indexed = {1}
    assert results[1] == relay.Delivered()
    assert splunk.polls == [[0, 1], [1]], "the follower took over the same schedule"


async def test_confirmation_after_giving_up_is_logged(autojump_clock: Any) -> None:
    """A follower times out while the leader's poll, which confirms it, is still on the wire."""
    splunk = Splunk(latency=5.0)
    acks = tracker(splunk, interval=10, timeout=12)
    splunk.indexed = {5}
    results: dict[int, relay.Result] = {}
    with structlog.testing.capture_logs() as events:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _set(results, 4, acks.wait(4)))
            await trio.sleep(1)
            nursery.start_soon(lambda: _set(results, 5, acks.wait(5)))
    assert isinstance(results[5], relay.RetryLater), "gave up at t=13; the answer came at t=15"
    assert isinstance(results[4], relay.RetryLater)
    assert [(e["event"], e["ack_id"]) for e in events] == [("hec_ack_after_giving_up", 5)]
