"""Destination `splunk_hec` against the fake HEC (real HTTP on 127.0.0.1), and reply mapping via MockTransport.

Each delivery case says what Splunk ended up holding (delivered), what went to the dead-letter store, and
what was sent twice; every test that uses `logs` fails if a token shows up in any captured log output.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import structlog
import trio
import trustme

import relay
from relay.context import MemoryStateStore
from relay.settings import Secret
from relay_plugins.hec_protocol import MAX_CACHED_MIDDLES, EnvelopeEncoder
from relay_plugins.splunk_hec import SplunkHecDestination, SplunkHecSettings
from tests import scripted
from tests.fakes.hec import FakeHec, Token, serve
from tests.hec_support import ACK_TOKEN, TOKEN, Captured, batch_of, destination, entries, no_token, stamp
from tests.helpers import (
    RelayProcess,
    config_dict,
    dead_letters,
    destination_row,
    journal_entries,
    make_config,
    running_relay,
    wait_until,
    write_config,
)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[Captured]:
    """Capture all logs; at the end, fail if either token appears in any of them."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        captured = Captured(events, caplog)
        yield captured
    text = captured.text()
    assert TOKEN not in text and ACK_TOKEN not in text, "a token appeared in the logs"


@pytest.fixture
async def hec(nursery: trio.Nursery) -> FakeHec:
    fake = FakeHec([Token(TOKEN), Token(ACK_TOKEN, use_ack=True)])
    await nursery.start(serve, fake)
    return fake


async def send(dest: SplunkHecDestination, batch: relay.Batch) -> relay.Result:
    await dest.open()
    try:
        return await dest.send(batch)
    finally:
        await dest.close()


def relay_config(tmp_path: Path, url: str, **settings: Any) -> Any:
    dest = {"type": "splunk_hec", "url": url, "token": TOKEN,
            "retry": {"initial_backoff": "10ms", "max_backoff": "100ms"}, "batch": {"max_wait": "10ms"}, **settings}
    return make_config(config_dict(tmp_path, {"in": {"type": "manual"}}, {"hec": dest}), extra=[scripted])


# -- the envelope on the wire --------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "none"])
async def test_batch_is_concatenated_envelopes(tmp_path: Path, hec: FakeHec, logs: Captured,
                                               compression: str) -> None:
    values = entries(3)
    values[1]["actor"]["type"] = "api_key"
    dest = destination(tmp_path, hec.url, compression=compression, index="audit", source="incident.io",
                       host="relay-1")
    assert await send(dest, batch_of(values)) == relay.Delivered()
    [request] = [r for r in hec.requests if r.path.endswith("/event")]
    assert request.headers["authorization"] == f"Splunk {TOKEN}"
    assert request.headers.get("content-encoding") == ("gzip" if compression == "gzip" else None)
    channel = request.headers["x-splunk-request-channel"]
    assert len(channel) == 36
    assert request.body.count(b"\n") == 2, "three envelopes, newline-separated"
    assert b'"time":1715677200.000000,' in request.body and b'"time":1715677202.000002,' in request.body
    assert [e.event for e in hec.events] == values, "event is the entry itself, unchanged"
    first = hec.events[0].envelope
    assert {k: first[k] for k in ("host", "source", "sourcetype", "index")} == {
        "host": "relay-1", "source": "incident.io", "sourcetype": "incidentio:audit", "index": "audit"}
    assert [e.envelope["fields"] for e in hec.events] == [
        {"action": "api_key.created", "actor.type": "user"},
        {"action": "api_key.created", "actor.type": "api_key"},
        {"action": "api_key.created", "actor.type": "user"}]


async def test_time_keeps_microseconds_and_fields_stay_flat(tmp_path: Path, hec: FakeHec) -> None:
    value = entries(1)[0]
    value["occurred_at"] = "2024-05-14T09:30:00.999999Z"
    value["context"]["tags"] = ["a", 1, {"nested": True}]
    dest = destination(tmp_path, hec.url, indexed_fields=["action", "context", "context.tags", "missing.path",
                                                         "version"])
    assert await send(dest, batch_of([value])) == relay.Delivered()
    [event] = hec.events
    assert b'"time":1715679000.999999,' in hec.requests[-1].body
    assert event.envelope["fields"] == {"action": "api_key.created", "context.tags": ["a", "1"], "version": "1"}
    assert "index" not in event.envelope and "source" not in event.envelope, "unset: Splunk's defaults apply"


def test_envelopes_built_from_remembered_fields_match_and_the_memory_is_bounded() -> None:
    encoder = EnvelopeEncoder(host="relay-1", source=None, sourcetype="audit", index=None,
                              indexed_fields=["action", "actor.type"])
    data = b'{"action":"a.b"}'
    for round_ in range(2):  # the second round comes from what the first remembered
        for i in range(MAX_CACHED_MIDDLES + 10):
            action, actor_type = f"family.action_{i // 2}", ("user", "api_key")[i % 2]
            envelope = orjson.loads(encoder.encode(data, 1715679000.5 + i, action, actor_type))
            assert envelope == {"time": 1715679000.5 + i, "host": "relay-1", "sourcetype": "audit", "event": {
                "action": "a.b"}, "fields": {"action": action, "actor.type": actor_type}}, (round_, i)
            assert len(encoder._middles) <= MAX_CACHED_MIDDLES
    assert encoder.encode(data, -1.25, "x", "user").startswith(b'{"time":-1.250000,')


# -- tokens and configuration problems halt, without the token in the reason ---------------------------------


@pytest.mark.parametrize(("token_state", "expected"), [
    ("revoked", "HEC code 4 (Invalid token), HTTP 403"),
    ("disabled", "HEC code 1 (Token disabled), HTTP 403"),
])
async def test_token_problems_halt(tmp_path: Path, hec: FakeHec, logs: Captured, token_state: str,
                                   expected: str) -> None:
    if token_state == "revoked":
        del hec.tokens[TOKEN]
    else:
        hec.tokens[TOKEN].enabled = False
    result = await send(destination(tmp_path, hec.url), batch_of(entries(2)))
    assert isinstance(result, relay.Halted)
    assert expected in result.reason and no_token(result.reason)
    assert hec.events == []


async def test_incorrect_index_halts(tmp_path: Path, logs: Captured, nursery: trio.Nursery) -> None:
    fake = FakeHec([Token(TOKEN, indexes={"audit"})], index_error_off_by_one=True)
    await nursery.start(serve, fake)
    result = await send(destination(tmp_path, fake.url, index="main"), batch_of(entries(3)))
    assert isinstance(result, relay.Halted)
    assert "HEC code 7 (Incorrect index), HTTP 400" in result.reason and "'main'" in result.reason
    assert fake.events == []


async def test_channel_is_required_with_ack_and_always_sent(tmp_path: Path, hec: FakeHec) -> None:
    async with httpx.AsyncClient(base_url=hec.url, headers={"Authorization": f"Splunk {ACK_TOKEN}"}) as client:
        missing = await client.post("/services/collector/event", content=b'{"event":"x"}')
        bad = await client.post("/services/collector/event", content=b'{"event":"x"}',
                                headers={"X-Splunk-Request-Channel": "not-a-guid"})
    assert (missing.status_code, missing.json()["code"]) == (400, 10)
    assert (bad.status_code, bad.json()["code"]) == (400, 11)
    assert await send(destination(tmp_path, hec.url, token=ACK_TOKEN), batch_of(entries(1))) == relay.Delivered()


# -- entries Splunk refuses: before N delivered, N dead-lettered, the rest sent again -----------------------


@pytest.mark.parametrize(("code", "text"), [
    (6, "Invalid data format"), (12, "Event field is required"), (13, "Event field cannot be blank"),
    (15, "Error in handling indexed fields")])
async def test_invalid_event_number_dead_letters_only_that_entry(tmp_path: Path, hec: FakeHec, logs: Captured,
                                                                 code: int, text: str) -> None:
    bad = stamp(2)
    hec.poison(lambda event: event["occurred_at"] == bad, code, text)
    async with running_relay(relay_config(tmp_path, hec.url)) as service:
        await service.sources["in"].intake.submit(entries(6))
        with trio.fail_after(10):
            await service.destinations["hec"].loop.wait_offset(6)
    received = Counter(hec.ids())
    assert set(received) == {stamp(i) for i in (0, 1, 3, 4, 5)}, "delivered: all but the bad one"
    assert max(received.values()) == 1, "nothing sent twice"
    [(seq, reason, _)] = dead_letters(tmp_path / "state", "hec")
    assert seq == 3 and f"HEC code {code} ({text}), HTTP 400" in reason and "entry 2" in reason
    posts = [r for r in hec.requests if r.path.endswith("/event")]
    assert [r.body.count(b"\n") + 1 for r in posts] == [6, 3], "the rest (entries 3..5) is sent again, alone"


async def test_unnamed_bad_entry_is_found_one_by_one(tmp_path: Path, hec: FakeHec, logs: Captured) -> None:
    """A code 6 without invalid-event-number: the rest of the batch goes one entry per request."""
    bad = stamp(2)
    hec.poison(lambda event: event["occurred_at"] == bad, 6, "Invalid data format", name_it=False)
    async with running_relay(relay_config(tmp_path, hec.url)) as service:
        await service.sources["in"].intake.submit(entries(4))
        with trio.fail_after(10):
            await service.destinations["hec"].loop.wait_offset(4)
    received = Counter(hec.ids())
    assert set(received) == {stamp(i) for i in (0, 1, 3)}
    assert [k for k, n in received.items() if n == 2] == [stamp(0), stamp(1)], \
        "sent twice: the entries Splunk had indexed before the unnamed bad one"
    assert [seq for seq, _, _ in dead_letters(tmp_path / "state", "hec")] == [3]
    assert logs.named("hec_isolating_entries")


# -- retries: busy storms, 429, 5xx -----------------------------------------------------------------------


async def test_busy_storm_is_retried_and_nothing_is_sent_twice(tmp_path: Path, hec: FakeHec, logs: Captured) -> None:
    hec.fail_next(6, code=9, status=503, text="Server is busy")
    hec.fail_next(1, code=8, status=500, text="Internal server error")
    hec.fail_next(1, code=18, status=503, text="HEC is unhealthy, queues are full")
    async with running_relay(relay_config(tmp_path, hec.url, concurrency=1)) as service:
        await service.sources["in"].intake.submit(entries(10))
        with trio.fail_after(10):
            await service.destinations["hec"].loop.wait_offset(10)
    assert sorted(hec.ids()) == [stamp(i) for i in range(10)], "every entry exactly once"
    assert dead_letters(tmp_path / "state", "hec") == []
    assert [r.status for r in hec.requests if r.path.endswith("/event")] == [503] * 6 + [500, 503, 200]
    retried = [e for e in logs.events if e.get("event") == "retry_scheduled"]
    assert len(retried) == 8 and "HEC code 9 (Server is busy), HTTP 503" in retried[0]["reason"]


async def test_429_waits_as_long_as_asked(tmp_path: Path, hec: FakeHec, logs: Captured) -> None:
    hec.fail_next(1, code=None, status=429, body=b"Too Many Requests", retry_after="7")
    result = await send(destination(tmp_path, hec.url), batch_of(entries(2)))
    assert result == relay.RetryLater("'Too Many Requests', HTTP 429", 7.0)
    assert hec.events == []


async def test_unreachable_splunk_is_retried(tmp_path: Path, logs: Captured) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await send(destination(tmp_path, f"http://127.0.0.1:{port}"), batch_of(entries(1)))
    assert isinstance(result, relay.RetryLater) and f"127.0.0.1:{port}: ConnectError" in result.reason


# -- request size: Splunk Cloud's 1 MB --------------------------------------------------------------------


async def test_batch_over_max_request_bytes_goes_in_several_requests(tmp_path: Path, hec: FakeHec) -> None:
    async with running_relay(relay_config(tmp_path, hec.url, max_request_bytes="16KiB")) as service:
        await service.sources["in"].intake.submit(entries(100))
        with trio.fail_after(10):
            await service.destinations["hec"].loop.wait_offset(100)
    posts = [r for r in hec.requests if r.path.endswith("/event")]
    assert len(posts) >= 3 and all(len(r.body) <= 16 * 1024 for r in posts)
    assert sorted(hec.ids()) == [stamp(i) for i in range(100)], "every entry exactly once"


async def test_413_lowers_the_request_size(tmp_path: Path, logs: Captured, nursery: trio.Nursery) -> None:
    fake = FakeHec([Token(TOKEN)], max_content_length=20_000)
    await nursery.start(serve, fake)
    async with running_relay(relay_config(tmp_path, fake.url)) as service:
        await service.sources["in"].intake.submit(entries(60))
        with trio.fail_after(10):
            await service.destinations["hec"].loop.wait_offset(60)
    assert sorted(fake.ids()) == [stamp(i) for i in range(60)], "every entry exactly once"
    assert fake.requests[0].status == 413 and logs.named("hec_request_limit_lowered")


async def test_single_entry_over_the_limit_is_dead_lettered(tmp_path: Path, logs: Captured,
                                                            nursery: trio.Nursery) -> None:
    fake = FakeHec([Token(TOKEN)], max_content_length=20_000)
    await nursery.start(serve, fake)
    big = entries(1, 1)[0]
    big["actor"]["name"] = "x" * 30_000
    result = await send(destination(tmp_path, fake.url), batch_of([big]))
    assert isinstance(result, relay.Rejected) and result.resend_from is None
    assert "HTTP 413" in result.reasons[0] and "one entry" in result.reasons[0]


# -- indexer acknowledgement ------------------------------------------------------------------------------


async def manual_ack_destination(tmp_path: Path, hec: FakeHec) -> SplunkHecDestination:
    """An opened destination with `ack: true`; Splunk confirms nothing until the test calls `confirm()`."""
    hec.ack_mode = "manual"
    dest = destination(tmp_path, hec.url, token=ACK_TOKEN, ack=True, ack_poll_interval=0.05)
    await dest.open()
    return dest


async def test_ack_delivered_only_once_confirmed(tmp_path: Path, hec: FakeHec, logs: Captured) -> None:
    dest = await manual_ack_destination(tmp_path, hec)
    results: list[relay.Result] = []
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            results.append(await dest.send(batch_of(entries(3))))
        nursery.start_soon(run)
        await hec.wait_for(lambda: hec.ack_requests >= 2)
        assert results == [] and len(hec.events) == 3, "indexed, polled, not yet confirmed: not delivered"
        hec.confirm()
    await dest.close()
    assert results == [relay.Delivered()]
    polls = [r for r in hec.requests if r.path.endswith("/ack")]
    channel = polls[0].headers["x-splunk-request-channel"]
    assert all(orjson.loads(p.body) == {"acks": [0]} and p.query["channel"] == [channel] for p in polls)
    assert polls[-1].reply == {"acks": {"0": True}}


async def test_one_poll_covers_every_pending_ack(tmp_path: Path, hec: FakeHec, logs: Captured) -> None:
    dest = await manual_ack_destination(tmp_path, hec)
    results: list[relay.Result] = []
    async with trio.open_nursery() as nursery:
        for i in range(5):
            async def run(i: int = i) -> None:
                results.append(await dest.send(batch_of(entries(2, start=2 * i), first_seq=1 + 2 * i)))
            nursery.start_soon(run)
        await hec.wait_for(lambda: len(hec.events) == 10)
        mark = hec.ack_requests
        await hec.wait_for(lambda: hec.ack_requests >= mark + 2)
        hec.confirm()
    await dest.close()
    assert results == [relay.Delivered()] * 5
    polls = [orjson.loads(r.body)["acks"] for r in hec.requests if r.path.endswith("/ack")]
    assert polls[-1] == [0, 1, 2, 3, 4], "one request for all pending ack ids of the channel"
    assert len(polls) <= mark + 3, "no poll per waiter: one shared schedule"


async def test_lost_ack_resends_the_batch_after_ack_timeout(tmp_path: Path, hec: FakeHec, logs: Captured) -> None:
    hec.ack_mode = "lost"
    config = relay_config(tmp_path, hec.url, token=ACK_TOKEN, ack=True, ack_poll_interval="50ms",
                          ack_timeout="300ms")
    async with running_relay(config) as service:
        loop = service.destinations["hec"].loop
        await service.sources["in"].intake.submit(entries(3))
        await hec.wait_for(lambda: len(hec.events) == 3)
        assert loop.offset == 0, "indexed but never confirmed: not delivered"
        hec.ack_mode = "immediate"
        with trio.fail_after(10):
            await loop.wait_offset(3)
    assert Counter(hec.ids()) == {stamp(i): 2 for i in range(3)}, "sent twice: exactly the unconfirmed batch"
    assert dead_letters(tmp_path / "state", "hec") == []
    assert destination_row(tmp_path / "state", "hec")["delivered"] == 3
    assert any("within ack_timeout" in e.get("reason", "") for e in logs.named("retry_scheduled"))


async def test_reused_ack_id_after_splunk_restart_resends_the_older_batch(tmp_path: Path, hec: FakeHec,
                                                                         logs: Captured) -> None:
    dest = await manual_ack_destination(tmp_path, hec)
    results: dict[str, relay.Result] = {}
    async with trio.open_nursery() as nursery:
        async def run(name: str, start: int) -> None:
            results[name] = await dest.send(batch_of(entries(1, start), first_seq=start + 1))
        nursery.start_soon(run, "older", 0)
        await hec.wait_for(lambda: len(hec.events) == 1)
        hec.restart()
        nursery.start_soon(run, "newer", 1)
        await hec.wait_for(lambda: len(hec.events) == 2)
        await hec.wait_for(lambda: "older" in results)
        hec.confirm()
    await dest.close()
    assert isinstance(results["older"], relay.RetryLater) and "ack id 0 again" in results["older"].reason
    assert results["newer"] == relay.Delivered()
    assert logs.named("hec_ack_id_reused")


async def test_channel_survives_restarts(tmp_path: Path, hec: FakeHec) -> None:
    state = MemoryStateStore()
    for _ in range(2):
        dest = destination(tmp_path, hec.url, token=ACK_TOKEN, ack=True, ack_poll_interval=0.05, state=state)
        assert await send(dest, batch_of(entries(1))) == relay.Delivered()
    channels = {r.headers["x-splunk-request-channel"] for r in hec.requests}
    assert channels == {state.values["channel"]}


async def test_ack_on_a_token_without_ack_is_delivered_with_a_warning(tmp_path: Path, hec: FakeHec,
                                                                       logs: Captured) -> None:
    dest = destination(tmp_path, hec.url, ack=True, ack_poll_interval=0.05)
    assert await send(dest, batch_of(entries(2))) == relay.Delivered()
    assert logs.named("hec_ack_not_enabled") and not [r for r in hec.requests if r.path.endswith("/ack")]


def test_ack_raises_concurrency_and_attempt_time(tmp_path: Path) -> None:
    plain = relay_config(tmp_path, "https://splunk.example.com:8088").destinations["hec"]
    acked = relay_config(tmp_path, "https://splunk.example.com:8088", ack=True).destinations["hec"]
    assert (plain.concurrency, acked.concurrency) == (4, 32)
    dest = destination(tmp_path, "https://splunk.example.com:8088", ack=True, ack_timeout="2m")
    assert dest.attempt_timeout(60.0) == 180.0
    assert destination(tmp_path, "https://splunk.example.com:8088").attempt_timeout(60.0) == 60.0


# -- check() --------------------------------------------------------------------------------------------


async def test_check_passes_with_a_good_token(tmp_path: Path, hec: FakeHec) -> None:
    dest = destination(tmp_path, hec.url, token=ACK_TOKEN, ack=True)
    await dest.open()
    assert (await dest.check()).endswith("HEC healthy, token accepted, indexer acknowledgement on")
    await dest.close()
    assert hec.events == [], "the token test sends no event"
    live = dest._channel
    assert all(r.headers.get("x-splunk-request-channel") != live for r in hec.requests), \
        "probes never use the live channel (a poll there could consume a real confirmation)"


@pytest.mark.parametrize(("setup", "message"), [
    ("revoked", "token test: HEC code 4 (Invalid token), HTTP 403"),
    ("unhealthy", "health: HEC code 18 (HEC is unhealthy, queues are full), HTTP 503"),
    ("no-ack", "ack test: HEC code 14 (ACK is disabled), HTTP 400"),
])
async def test_check_failures(tmp_path: Path, hec: FakeHec, logs: Captured, setup: str, message: str) -> None:
    if setup == "revoked":
        del hec.tokens[TOKEN]
    elif setup == "unhealthy":
        hec.health = 18
    dest = destination(tmp_path, hec.url, ack=setup == "no-ack")
    await dest.open()
    with pytest.raises(relay.CheckFailed) as failed:
        await dest.check()
    await dest.close()
    assert str(failed.value).startswith(message) and no_token(failed.value)


# -- TLS --------------------------------------------------------------------------------------------------


async def test_tls_with_ca_file_and_untrusted_certificate(tmp_path: Path, logs: Captured,
                                                          nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    fake = FakeHec([Token(TOKEN)])
    await nursery.start(lambda task_status: serve(fake, cert_file=str(tmp_path / "server.pem"),
                                                  key_file=str(tmp_path / "server.pem"), task_status=task_status))
    assert fake.url.startswith("https://")
    trusted = destination(tmp_path, fake.url, tls={"ca_file": tmp_path / "ca.pem"})
    assert await send(trusted, batch_of(entries(1))) == relay.Delivered()
    untrusted = await send(destination(tmp_path, fake.url), batch_of(entries(1, 1)))
    assert isinstance(untrusted, relay.Halted)
    assert "not trusted" in untrusted.reason and "tls.ca_file" in untrusted.reason
    unverified = destination(tmp_path, fake.url, tls={"verify": False})
    assert await send(unverified, batch_of(entries(1, 2))) == relay.Delivered()
    assert fake.ids() == [stamp(0), stamp(2)]


# -- reply mapping, cheaply, with httpx.MockTransport -------------------------------------------------------


def _reply(status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    content = orjson.dumps(body) if isinstance(body, dict) else body

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers=headers)
    return httpx.MockTransport(handler)


@pytest.mark.parametrize(("status", "body", "headers", "expected"), [
    (200, {"text": "Success", "code": 0}, None, relay.Delivered()),
    (200, b"", None, relay.Delivered()),
    (503, {"text": "Server is busy", "code": 9}, {"Retry-After": "5"},
     relay.RetryLater("HEC code 9 (Server is busy), HTTP 503", 5.0)),
    (500, {"text": "Internal server error", "code": 8}, None,
     relay.RetryLater("HEC code 8 (Internal server error), HTTP 500")),
    (503, {"text": "HEC is unhealthy, ack service unavailable", "code": 19}, None, relay.RetryLater),
    (503, {"text": "HEC is unhealthy, queues are full, ack service unavailable", "code": 20}, None,
     relay.RetryLater),
    (502, b"<html>Bad Gateway</html>", None, relay.RetryLater("'<html>Bad Gateway</html>', HTTP 502")),
    (408, b"", None, relay.RetryLater),
    (401, {"text": "Token is required", "code": 2}, None, relay.Halted),
    (401, {"text": "Invalid authorization", "code": 3}, None, relay.Halted),
    (400, {"text": "Invalid token", "code": 21}, None, relay.Halted),
    (400, {"text": "Token disabled", "code": 22}, None, relay.Halted),
    (400, {"text": "No data", "code": 5}, None, relay.Halted),
    (400, {"text": "Data channel is missing", "code": 10}, None, relay.Halted),
    (400, {"text": "Invalid data channel", "code": 11}, None, relay.Halted),
    (400, {"text": "ACK is disabled", "code": 14}, None, relay.Halted),
    (400, {"text": "Query string authorization is not enabled", "code": 16}, None, relay.Halted),
    (404, {"text": "The requested URL was not found on this server.", "code": 404}, None, relay.Halted),
    (301, b"", {"Location": "https://elsewhere/"}, relay.Halted),
    (415, b"", None, relay.Halted),
    (400, {"text": "Invalid data format", "code": 6, "invalid-event-number": 3}, None,
     relay.Rejected({3: "HEC code 6 (Invalid data format), HTTP 400: Splunk refused entry 3 of the request"}, 4)),
    (400, {"text": "Event field is required", "code": 12, "invalid-event-number": 0}, None,
     relay.Rejected({0: "HEC code 12 (Event field is required), HTTP 400: Splunk refused entry 0 of the request"},
                    1)),
    (400, {"text": "Error in handling indexed fields", "code": 15, "invalid-event-number": "4"}, None,
     relay.Rejected({4: "HEC code 15 (Error in handling indexed fields), HTTP 400: Splunk refused entry 4 of the "
                        "request"}, 5)),
    (400, {"text": "Invalid data format", "code": 6, "invalid-event-number": 9}, None, relay.RetryLater),
    (413, b"", None, relay.RetryLater),
])
async def test_reply_mapping(tmp_path: Path, logs: Captured, status: int, body: dict[str, Any] | bytes,
                             headers: dict[str, str] | None, expected: Any) -> None:
    dest = destination(tmp_path, "https://splunk.example.com:8088", transport=_reply(status, body, headers))
    result = await send(dest, batch_of(entries(5)))
    if isinstance(expected, type):
        assert isinstance(result, expected), result
        assert f"HTTP {status}" in getattr(result, "reason", "")
    else:
        assert result == expected
    assert no_token(result)


async def test_transport_errors_map_to_retry(tmp_path: Path, logs: Captured) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)
    dest = destination(tmp_path, "https://splunk.example.com:8088", transport=httpx.MockTransport(refuse))
    result = await send(dest, batch_of(entries(1)))
    assert isinstance(result, relay.RetryLater) and "within timeout (30s)" in result.reason


async def test_server_text_echoing_the_token_is_masked(tmp_path: Path, logs: Captured) -> None:
    transport = _reply(400, {"text": f"Invalid token {TOKEN}", "code": 4})
    result = await send(destination(tmp_path, "https://splunk.example.com:8088", transport=transport),
                        batch_of(entries(1)))
    assert isinstance(result, relay.Halted) and no_token(result.reason) and "********" in result.reason


async def test_the_log_capture_would_see_a_leaked_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The `logs` check can fail: a plugin log line with the token is captured, unscrubbed."""
    with structlog.testing.capture_logs() as events:
        dest = destination(tmp_path, "https://splunk.example.com:8088")
        dest.log.warning("oops", token=Secret(TOKEN).reveal())
    assert TOKEN in Captured(events, caplog).text()


@pytest.mark.parametrize(("settings", "message"), [
    ({"url": "ftp://splunk:8088"}, "must be an http:// or https:// address"),
    ({"url": "https://splunk:8088/services/collector/event"}, "base address without /services/collector"),
    ({"url": "https://splunk:8088?token=x"}, "must not have a query"),
    ({"indexed_fields": ["actor..type"]}, "not a dotted field path"),
    ({"ack": True, "ack_timeout": "5s", "ack_poll_interval": "10s"}, "ack_timeout must be longer"),
    ({"tls": {"ca_file": "/nonexistent/ca.pem"}}, "Path does not point to a file"),
    ({"token": "abc def\n"}, "must not contain spaces, line breaks"),
])
def test_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    values = {"url": "https://splunk.example.com:8088", "token": TOKEN, **settings}
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        SplunkHecSettings(**values)


# -- end to end: the whole relay, a revoked token, recovery, nothing lost -------------------------------------


async def test_end_to_end_revoked_token_halts_then_recovers(tmp_path: Path, hec: FakeHec, logs: Captured) -> None:
    del hec.tokens[TOKEN]
    config = make_config(config_dict(
        tmp_path, {"demo": {"type": "demo", "rate": 2000, "count": 300, "seed": 7}},
        {"hec": {"type": "splunk_hec", "url": hec.url, "token": "${SPLUNK_HEC_TOKEN}",
                 "retry": {"initial_backoff": "10ms", "max_backoff": "200ms"}, "batch": {"max_wait": "10ms"}}}),
        env={"SPLUNK_HEC_TOKEN": TOKEN})
    async with running_relay(config) as service:
        loop = service.destinations["hec"].loop
        with trio.fail_after(10):
            await loop.wait_state("halted")
        assert "HEC code 4 (Invalid token), HTTP 403" in (loop.reason or "") and no_token(loop.reason)
        row = destination_row(tmp_path / "state", "hec")
        assert row["state"] == "halted" and no_token(row["state_reason"])
        hec.tokens[TOKEN] = Token(TOKEN)
        with trio.fail_after(20):
            await loop.wait_offset(300)
        assert loop.state == "up"
    journaled = [data for _, data in journal_entries(tmp_path / "state")]
    assert len(journaled) == 300
    received = [orjson.dumps(e.event) for e in hec.events]
    assert Counter(received) == Counter(journaled), "every journaled entry reached Splunk exactly once"
    assert dead_letters(tmp_path / "state", "hec") == []
    assert logs.named("destination_halted") and logs.named("destination_recovered")


async def test_kill_9_with_unconfirmed_acks_resends_after_restart(tmp_path: Path, hec: FakeHec) -> None:
    """The relay process is killed while Splunk has indexed everything but confirmed nothing: the offset
    has not moved, so after the restart every batch is sent again (on the same channel) and confirmed."""
    hec.ack_mode = "manual"
    total = 200
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, {"demo": {"type": "demo", "rate": 5000, "count": total}},
        {"hec": {"type": "splunk_hec", "url": hec.url, "token": "${SPLUNK_HEC_TOKEN}", "ack": True,
                 "ack_poll_interval": "50ms", "batch": {"max_entries": 50, "max_wait": "10ms"}}}))
    relay_process = RelayProcess(config, tmp_path / "relay.log", env={"SPLUNK_HEC_TOKEN": ACK_TOKEN})
    state = tmp_path / "state"
    try:
        await trio.to_thread.run_sync(relay_process.start)
        with trio.fail_after(30):
            await hec.wait_for(lambda: len(hec.events) == total)
        await trio.to_thread.run_sync(relay_process.kill)
        assert destination_row(state, "hec")["offset"] == 0, "indexed but unconfirmed: nothing committed"
        first_channels = {r.headers["x-splunk-request-channel"] for r in hec.requests}
        hec.ack_mode = "immediate"
        await trio.to_thread.run_sync(relay_process.start)
        await wait_until(lambda: destination_row(state, "hec")["offset"] == total, 30, "offset at the end")
        assert await trio.to_thread.run_sync(relay_process.terminate) == 0
    finally:
        relay_process.stop_quietly()
    journaled = [data for _, data in journal_entries(state)]
    assert len(journaled) == total
    assert Counter(orjson.dumps(e.event) for e in hec.events) == {data: 2 for data in journaled}, \
        "every entry sent exactly twice: once before the kill, once after"
    assert {r.headers["x-splunk-request-channel"] for r in hec.requests} == first_channels, \
        "the channel survived the restart"
    assert dead_letters(state, "hec") == []
    assert no_token(relay_process.log_text())
