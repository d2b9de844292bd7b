"""The fake HEC behaves as the protocol reference says Splunk does (so the splunk_hec tests mean something)."""

from __future__ import annotations

import base64
import gzip
import uuid
import zlib

import httpx
import pytest
import trio

from tests.fakes.hec import FakeHec, Token, serve

TOKEN = "fake-hec-token-0001"
ACK = "fake-hec-token-ack-0002"
EVENT = "/services/collector/event"


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeHec:
    hec = FakeHec([Token(TOKEN, indexes={"main", "audit"}), Token(ACK, use_ack=True),
                   Token("fake-hec-disabled", enabled=False)])
    await nursery.start(serve, hec)
    return hec


async def post(fake: FakeHec, body: bytes, token: str | None = TOKEN, path: str = EVENT,
               **headers: str) -> tuple[int, dict[str, object]]:
    if token is not None:
        headers.setdefault("Authorization", f"Splunk {token}")
    async with httpx.AsyncClient(base_url=fake.url) as client:
        response = await client.post(path, content=body, headers=headers)
    return response.status_code, response.json()


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({}, 401, 2),
    ({"Authorization": "Bearer " + TOKEN}, 401, 3),
    ({"Authorization": "Splunk"}, 401, 3),
    ({"Authorization": "Splunk wrong-token"}, 403, 4),
    ({"Authorization": "Splunk fake-hec-disabled"}, 403, 1),
    ({"Authorization": "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()}, 200, 0),
])
async def test_token_check(fake: FakeHec, headers: dict[str, str], status: int, code: int) -> None:
    got_status, reply = await post(fake, b'{"event":"x"}', None, **headers)
    assert (got_status, reply["code"]) == (status, code)


async def test_query_string_token_needs_query_auth(fake: FakeHec) -> None:
    assert (await post(fake, b'{"event":"x"}', None, path=f"{EVENT}?token={TOKEN}"))[1]["code"] == 16
    fake.query_auth = True
    assert (await post(fake, b'{"event":"x"}', None, path=f"{EVENT}?token={TOKEN}"))[1]["code"] == 0


async def test_paths_methods_and_health(fake: FakeHec) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        health = await client.get("/services/collector/health")
        get_event = await client.get(EVENT, headers={"Authorization": f"Splunk {TOKEN}"})
        unknown = await client.post("/services/collector/nope", headers={"Authorization": f"Splunk {TOKEN}"})
    assert (health.status_code, health.json()) == (200, {"text": "HEC is healthy", "code": 17})
    assert get_event.status_code == 405 and unknown.status_code == 404 and unknown.json()["code"] == 404
    for alias in ("/services/collector", "/services/collector/event/1.0"):
        assert (await post(fake, b'{"event":"x"}', path=alias))[1]["code"] == 0


async def test_envelopes_concatenated_and_compressed(fake: FakeHec) -> None:
    assert await post(fake, b'{"event":"a"}{"event":{"b":1}}\n  {"event":"c","time":"1715679000.5"}') == (
        200, {"text": "Success", "code": 0})
    assert await post(fake, gzip.compress(b'{"event":"d"}\n{"event":"e"}'), **{"Content-Encoding": "gzip"}) == (
        200, {"text": "Success", "code": 0})
    assert [e.event for e in fake.events] == ["a", {"b": 1}, "c", "d", "e"]
    assert (await post(fake, zlib.compress(b'{"event":"f"}'), **{"Content-Encoding": "deflate"}))[0] == 415
    assert await post(fake, b"not gzip", **{"Content-Encoding": "gzip"}) == (
        400, {"text": "Invalid data format", "code": 6, "invalid-event-number": 0})
    assert await post(fake, b"") == (400, {"text": "No data", "code": 5})


@pytest.mark.parametrize(("bad", "code"), [
    (b'{"no_event":1}', 12),
    (b'{"event":""}', 13),
    (b'{"event":"x","fields":{"a":{"nested":1}}}', 15),
    (b'{"event":"x","time":"yesterday"}', 6),
    (b'["event"]', 6),
    (b'{"event":"x",', 6),
    (b'{"event":"x","index":"secret"}', 7),
])
async def test_partial_acceptance_names_the_bad_envelope(fake: FakeHec, bad: bytes, code: int) -> None:
    status, reply = await post(fake, b'{"event":0}{"event":1}' + bad + b'{"event":3}')
    assert status == 400 and reply["code"] == code and reply["invalid-event-number"] == 2
    assert [e.event for e in fake.events] == [0, 1], "objects before N are indexed, N and after are not"


async def test_incorrect_index_may_be_named_one_late(nursery: trio.Nursery) -> None:
    fake = FakeHec([Token(TOKEN, indexes={"main"})], index_error_off_by_one=True)
    await nursery.start(serve, fake)
    assert (await post(fake, b'{"event":0}{"event":1,"index":"x"}'))[1]["invalid-event-number"] == 2


async def test_over_max_content_length_is_413(nursery: trio.Nursery) -> None:
    fake = FakeHec([Token(TOKEN)], max_content_length=100)
    await nursery.start(serve, fake)
    assert (await post(fake, b'{"event":"' + b"x" * 200 + b'"}'))[0] == 413


async def test_indexer_ack_exchange(fake: FakeHec) -> None:
    one, two = str(uuid.uuid4()), str(uuid.uuid4())
    channel = {"X-Splunk-Request-Channel": one}
    assert (await post(fake, b'{"event":"x"}', ACK))[1]["code"] == 10
    assert (await post(fake, b'{"event":"x"}', ACK, **{"X-Splunk-Request-Channel": "abc"}))[1]["code"] == 11
    fake.ack_mode = "manual"
    ids = [(await post(fake, b'{"event":"x"}', ACK, **channel))[1]["ackId"] for _ in range(3)]
    assert ids == [0, 1, 2], "counted from 0 per channel"
    assert (await post(fake, b'{"event":"y"}', ACK, **{"X-Splunk-Request-Channel": two}))[1]["ackId"] == 0
    poll = b'{"acks":[0,1,2,9]}'
    ack = "/services/collector/ack?channel=" + one
    assert (await post(fake, poll, ACK, path=ack))[1] == {"acks": {"0": False, "1": False, "2": False, "9": False}}
    fake.confirm()
    assert (await post(fake, poll, ACK, path=ack))[1] == {"acks": {"0": True, "1": True, "2": True, "9": False}}
    assert (await post(fake, poll, ACK, path=ack))[1] == {"acks": {"0": False, "1": False, "2": False, "9": False}}, \
        "true is reported once, then forgotten"
    assert (await post(fake, b'{"acks":[0]}', TOKEN, path=ack))[1]["code"] == 14


async def test_scripted_faults_come_first(fake: FakeHec) -> None:
    fake.fail_next(2, code=9)
    assert (await post(fake, b'{"event":"x"}'))[0] == 503
    assert (await post(fake, b'{"event":"x"}'))[0] == 503
    assert (await post(fake, b'{"event":"x"}'))[0] == 200
    assert (await post(fake, b'{"event":"x"}', "wrong"))[0] == 403, "auth is checked before faults"
