"""Source `http`: the push receiver over real loopback HTTP, its body parser, and its promise that a 200
means the entries are journaled (tested by SIGKILL right after the answer)."""

from __future__ import annotations

import gzip
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trustme
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

import relay
from relay.journal import Journal
from relay_plugins.http_auth import sign
from relay_plugins.http_bodies import BodyCollector, BodyError, BodyTooLarge, inflate, parse_entries
from relay_plugins.http_receiver import HttpSettings, HttpSource
from tests.helpers import (
    ROOT,
    RelayProcess,
    config_dict,
    entry,
    free_port,
    make_config,
    running_relay,
    wait_until,
    write_config,
)
from tests.journal_harness import FullableIntake, context_for, intake_for, open_journal, quarantined, stored

TOKEN = "push-token-0123456789abcdef"
BEARER = {"authorization": f"Bearer {TOKEN}"}


def many(n: int, action: str = "user.created") -> list[dict[str, Any]]:
    return [entry(action, occurred_at=f"2024-05-14T09:{i // 60 % 60:02d}:{i % 60:02d}.000000Z", n=i)
            for i in range(n)]


@asynccontextmanager
async def receiving(journal: Journal, auth: Any = None, *, intake: Any = None, **overrides: Any
                    ) -> AsyncIterator[tuple[HttpSource, httpx.AsyncClient]]:
    """The receiver on a free loopback port, and a client for it."""
    verify: Any = overrides.pop("_verify", True)
    settings_ = HttpSettings.model_validate({"listen": "127.0.0.1:0",
                                             "auth": auth if auth is not None else {"bearer_tokens": [TOKEN]},
                                             **overrides})
    source = HttpSource(context_for(journal, "push"), settings_)
    await source.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, intake or await intake_for(journal, "push"))
        async with httpx.AsyncClient(base_url=source.addresses[0], verify=verify) as client:
            yield source, client
        nursery.cancel_scope.cancel()


async def post(client: httpx.AsyncClient, body: bytes | Any, headers: dict[str, str] | None = None,
               path: str = "/v1/entries") -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post(path, content=content, headers={**BEARER, **(headers or {})})


# -- body formats ------------------------------------------------------------------------------------------

ENTRIES = many(3)
NDJSON = b"\n".join(orjson.dumps(e) for e in ENTRIES)


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    (orjson.dumps(ENTRIES[0]), "application/json", 1),
    (orjson.dumps(ENTRIES), "application/json", 3),
    (NDJSON, "application/x-ndjson", 3),
    (NDJSON.replace(b"\n", b"\r\n\r\n") + b"\n", "application/json", 3),  # NDJSON recognised by its shape
    (orjson.dumps({"object": "list", "data": ENTRIES}), "application/json", 3),
    (orjson.dumps({"events": ENTRIES, "organization_id": "org_01"}), "application/json", 3),
    (b"\xef\xbb\xbf" + orjson.dumps(ENTRIES, option=orjson.OPT_INDENT_2), "text/plain", 3),
], ids=["object", "array", "ndjson", "ndjson-sniffed", "envelope-data", "envelope-events", "bom-pretty"])
async def test_each_body_format_is_accepted(tmp_path: Path, body: bytes, content_type: str, expected: int) -> None:
    async with open_journal(tmp_path / "state") as journal, receiving(journal) as (_, client):
        response = await post(client, body, {"content-type": content_type})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": expected, "duplicates": 0, "quarantined": 0}
    assert [orjson.loads(d) for d in stored(tmp_path / "state")] == ENTRIES[:expected]


async def test_gzip_bodies_including_several_members(tmp_path: Path) -> None:
    body = gzip.compress(NDJSON[:NDJSON.index(b"\n") + 1]) + gzip.compress(NDJSON[NDJSON.index(b"\n") + 1:])
    async with open_journal(tmp_path / "state") as journal, receiving(journal) as (_, client):
        response = await post(client, body, {"content-encoding": "gzip", "content-type": "application/x-ndjson"})
        assert response.json() == {"accepted": 3, "duplicates": 0, "quarantined": 0}
        again = await post(client, gzip.compress(orjson.dumps(ENTRIES)), {"content-encoding": "x-gzip"})
        assert again.json() == {"accepted": 0, "duplicates": 3, "quarantined": 0}
        other = await post(client, b"\x28\xb5\x2f\xfd", {"content-encoding": "zstd"})
        assert other.status_code == 415 and other.headers["accept-encoding"] == "gzip"
    assert len(stored(tmp_path / "state")) == 3


async def test_a_gzip_bomb_hits_max_body_size_not_memory(tmp_path: Path) -> None:
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]", compresslevel=9)
    assert len(bomb) < 1024 * 1024
    async with open_journal(tmp_path / "state") as journal, \
            receiving(journal, max_body_size="1MiB") as (_, client):
        response = await post(client, bomb, {"content-encoding": "gzip"})
    assert response.status_code == 413
    assert "inflates to more than max_body_size (1048576 bytes)" in response.json()["error"]
    assert quarantined(tmp_path / "state") == [] and stored(tmp_path / "state") == []


async def test_unreadable_bodies_answer_400_where_and_are_quarantined(tmp_path: Path) -> None:
    bad_ndjson = NDJSON + b'\n{"action": "user.created", oops}\n'
    async with open_journal(tmp_path / "state") as journal, receiving(journal) as (_, client):
        ndjson = await post(client, bad_ndjson, {"content-type": "application/x-ndjson"})
        json_ = await post(client, b'[{"action": "x"}, {"a": ]')
        not_gzip = await post(client, b'{"action": "x"}', {"content-encoding": "gzip"})
        scalar = await post(client, b'"just a string"')
        empty = await post(client, b"  \n")
    offset = len(NDJSON) + 1
    assert ndjson.status_code == 400
    assert ndjson.json()["error"].startswith(f"NDJSON line 4 (starting at byte {offset}) is not valid JSON: ")
    assert ndjson.json()["error"].endswith(f" at column 28 (byte {offset + 27})")
    assert json_.status_code == 400 and "at line 1, column 25 (byte 24)" in json_.json()["error"]
    assert not_gzip.status_code == 400 and "not valid gzip" in not_gzip.json()["error"]
    assert scalar.status_code == 400 and "the body is a JSON string" in scalar.json()["error"]
    assert empty.status_code == 400 and "empty" in empty.json()["error"]
    kept = quarantined(tmp_path / "state")
    assert [data for _, data in kept] == [bad_ndjson, b'[{"action": "x"}, {"a": ]', b'{"action": "x"}',
                                          b'"just a string"', b"  \n"]
    assert kept[0][0].startswith("http body from 127.0.0.1:") and "NDJSON line 4" in kept[0][0]
    assert stored(tmp_path / "state") == [], "nothing from an unreadable body is half-accepted"


async def test_invalid_entries_are_quarantined_one_by_one_and_the_rest_accepted(tmp_path: Path) -> None:
    batch = [ENTRIES[0], {"action": "user.created", "actor": {"type": "user", "id": "u1"}}, "text", ENTRIES[1]]
    async with open_journal(tmp_path / "state") as journal, receiving(journal) as (_, client):
        response = await post(client, batch)
    assert response.status_code == 200
    assert response.json() == {"accepted": 2, "duplicates": 0, "quarantined": 2, "problems": [
        {"index": 1, "reason": "entry 1: occurred_at: missing"},
        {"index": 2, "reason": "entry 2: an entry must be a JSON object, not a string"}]}
    assert len(stored(tmp_path / "state")) == 2
    assert [data for _, data in quarantined(tmp_path / "state")] == [orjson.dumps(batch[1]), b'"text"']


# -- authentication ------------------------------------------------------------------------------------------

async def test_bearer_tokens_401_when_missing_403_when_wrong_and_rotation(tmp_path: Path) -> None:
    auth = {"bearer_tokens": ["old-token-aaaaaaaaaaaa", TOKEN]}
    async with open_journal(tmp_path / "state") as journal, receiving(journal, auth) as (_, client):
        missing = await client.post("/v1/entries", content=b"not even json")
        basic = await client.post("/v1/entries", content=b"[]", headers={"authorization": "Basic dXNlcjpwYXNz"})
        wrong = await client.post("/v1/entries", content=b"garbage", headers={"authorization": "Bearer nope"})
        old = await client.post("/v1/entries", content=orjson.dumps(ENTRIES[0]),
                                headers={"authorization": "bearer old-token-aaaaaaaaaaaa"})
        new = await post(client, ENTRIES[1])
    assert (missing.status_code, missing.headers["www-authenticate"]) == (401, 'Bearer realm="audit-relay"')
    assert basic.status_code == 401 and "not a bearer token" in basic.json()["error"]
    assert wrong.status_code == 403 and "www-authenticate" not in wrong.headers
    assert (old.status_code, new.status_code) == (200, 200), "either token works while one is rotated"
    assert len(stored(tmp_path / "state")) == 2 and quarantined(tmp_path / "state") == []


async def test_custom_header(tmp_path: Path) -> None:
    auth = {"header": "X-Relay-Key", "value": TOKEN}
    async with open_journal(tmp_path / "state") as journal, receiving(journal, auth) as (_, client):
        missing = await client.post("/v1/entries", content=b"[]", headers=BEARER)
        wrong = await client.post("/v1/entries", content=b"[]", headers={"x-relay-key": TOKEN + "x"})
        right = await client.post("/v1/entries", content=orjson.dumps(ENTRIES), headers={"X-Relay-Key": TOKEN})
    assert missing.status_code == 401 and 'header="X-Relay-Key"' in missing.headers["www-authenticate"]
    assert wrong.status_code == 403
    assert right.json()["accepted"] == 3


async def test_workos_signature_valid_stale_forged_missing(tmp_path: Path) -> None:
    secret = "whsec-signing-secret-0123"
    body = orjson.dumps(ENTRIES)
    now_ms = int(time.time() * 1000)
    cases = {
        "valid": sign(secret, body, now_ms),
        "stale": sign(secret, body, now_ms - 181_000),
        "future": sign(secret, body, now_ms + 181_000),
        "forged": sign("another-secret-xyz", body, now_ms),
        "other body": sign(secret, body + b" ", now_ms),
        "malformed": "v1=abc",
    }
    async with open_journal(tmp_path / "state") as journal, \
            receiving(journal, {"signature_secret": secret}) as (_, client):
        answers = {name: await client.post("/v1/entries", content=body, headers={"WorkOS-Signature": value})
                   for name, value in cases.items()}
        missing = await client.post("/v1/entries", content=body)
        zipped = gzip.compress(body)
        compressed = await client.post("/v1/entries", content=zipped, headers={
            "content-encoding": "gzip", "workos-signature": sign(secret, zipped, now_ms)})
    assert answers["valid"].json() == {"accepted": 3, "duplicates": 0, "quarantined": 0}
    for name in ("stale", "future"):
        assert answers[name].status_code == 403 and "stale or replayed" in answers[name].json()["error"], name
    for name in ("forged", "other body"):
        assert answers[name].status_code == 403
        assert answers[name].json()["error"] == "the WorkOS-Signature does not match the body", name
    assert answers["malformed"].status_code == 403 and "malformed" in answers["malformed"].json()["error"]
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("WorkOS-Signature")
    assert compressed.json()["duplicates"] == 3, "the signature covers the body as sent"
    assert len(stored(tmp_path / "state")) == 3 and quarantined(tmp_path / "state") == []


async def test_bearer_and_signature_are_both_required_when_both_are_set(tmp_path: Path) -> None:
    secret = "whsec-signing-secret-0123"
    body = orjson.dumps(ENTRIES[0])
    signature = sign(secret, body, int(time.time() * 1000))
    auth = {"bearer_tokens": [TOKEN], "signature_secret": secret}
    async with open_journal(tmp_path / "state") as journal, receiving(journal, auth) as (_, client):
        no_token = await client.post("/v1/entries", content=body, headers={"workos-signature": signature})
        no_signature = await post(client, body)
        both = await post(client, body, {"workos-signature": signature})
    assert (no_token.status_code, no_signature.status_code, both.status_code) == (401, 401, 200)


async def test_generated_token_is_stored_0600_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    checked = HttpSource(relay.Context("push", "source", state), HttpSettings.model_validate(
        {"listen": "127.0.0.1:0", "auth": {"generate_token": True}}))
    await checked.open()  # what `relay check --connect` does: it must not create the token
    assert "a token is generated at first start" in await checked.check()
    await checked.close()
    assert not (state / "push.token").exists()
    async with open_journal(state) as journal:
        async with receiving(journal, {"generate_token": True}) as (_, client):
            token_file = state / "push.token"
            token = next(line for line in token_file.read_text().splitlines() if not line.startswith("#"))
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            ok = await client.post("/v1/entries", content=orjson.dumps(ENTRIES[0]),
                                   headers={"authorization": f"Bearer {token}"})
            assert ok.status_code == 200
        async with receiving(journal, {"generate_token": True}) as (_, client):
            again = await client.post("/v1/entries", content=orjson.dumps(ENTRIES[1]),
                                      headers={"authorization": f"Bearer {token}"})
            assert again.status_code == 200, "the second start reuses the stored token"
    assert len(token) >= 40


async def test_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# rotated 2024-05\n{TOKEN}\n\n  second-token-bbbbbbbbbb  \n")
    tokens.chmod(0o600)
    async with open_journal(tmp_path / "state") as journal, \
            receiving(journal, {"bearer_tokens_file": str(tokens)}) as (_, client):
        first = await post(client, ENTRIES[0])
        second = await client.post("/v1/entries", content=orjson.dumps(ENTRIES[1]),
                                   headers={"authorization": "Bearer second-token-bbbbbbbbbb"})
    assert (first.status_code, second.status_code) == (200, 200)
    tokens.write_text("# none yet\n")
    source = HttpSource(relay.Context("push", "source", tmp_path), HttpSettings.model_validate(
        {"listen": "127.0.0.1:0", "auth": {"bearer_tokens_file": str(tokens)}}))
    with pytest.raises(ValueError, match="holds no token"):
        await source.open()


async def test_a_reload_rotates_tokens_in_place_without_rebinding(tmp_path: Path) -> None:
    def config(token: str, **extra: Any) -> Any:
        return make_config(config_dict(tmp_path, {"push": {
            "type": "http", "listen": "127.0.0.1:0", "auth": {"bearer_tokens": [token]}, **extra}}, {}))

    async with running_relay(config(TOKEN)) as service:
        source = service.sources["push"].source
        assert isinstance(source, HttpSource)
        address = source.addresses[0]
        async with httpx.AsyncClient(base_url=address) as client:
            assert (await post(client, ENTRIES[0])).status_code == 200
            outcome = await service.reload(config("rotated-token-0123456789"))
            assert outcome.result == "applied", outcome
            assert service.sources["push"].source is source, "reconfigured in place, not restarted"
            old = await post(client, ENTRIES[1])
            new = await client.post("/v1/entries", content=orjson.dumps(ENTRIES[1]),
                                    headers={"authorization": "Bearer rotated-token-0123456789"})
            assert (old.status_code, new.status_code) == (403, 200)
            moved = await service.reload(config("rotated-token-0123456789", read_timeout="5s"))
            assert moved.result == "applied" and service.sources["push"].source is not source, "restarted"


async def test_auth_none_must_be_written_out(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with open_journal(tmp_path / "state") as journal, receiving(journal, "none") as (_, client):
            response = await client.post("/v1/entries", content=orjson.dumps(ENTRIES))
    assert response.json()["accepted"] == 3
    assert any(e["event"] == "http_auth_disabled" for e in logs)


@pytest.mark.parametrize(("raw", "message"), [
    ({"listen": "127.0.0.1:1"}, "`auth` is required"),
    ({"listen": "127.0.0.1:1", "auth": {}}, "no credentials configured"),
    ({"listen": "127.0.0.1:1", "auth": {"header": "X-Key"}}, "`header` and `value` go together"),
    ({"listen": "127.0.0.1:1", "auth": {"bearer_tokens": ["a" * 20], "header": "X-Key", "value": "v" * 20}},
     "not both"),
    ({"listen": "127.0.0.1:1", "auth": {"header": "X Key", "value": "v" * 20}}, "not a valid HTTP header name"),
    ({"listen": "127.0.0.1:1", "auth": "none", "path": "/healthz"}, "not /healthz"),
])
def test_settings_are_checked(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HttpSettings.model_validate(raw)


async def test_unauthenticated_requests_are_neither_stored_nor_logged(tmp_path: Path) -> None:
    marker = "CANARY-7f3a9c"
    body = orjson.dumps([entry(marker)])
    with capture_logs() as logs:
        async with open_journal(tmp_path / "state") as journal, receiving(journal) as (_, client):
            for headers in ({}, {"authorization": f"Bearer {marker}"}, {"authorization": marker}):
                await client.post(f"/v1/entries?{marker}", content=body, headers=headers)
    assert stored(tmp_path / "state") == [] and quarantined(tmp_path / "state") == []
    assert marker not in repr(logs)
    assert any(e["event"] == "http_auth_failed" and e["peer"].startswith("127.0.0.1:") for e in logs)


# -- limits, methods, paths, health, unavailability ---------------------------------------------------------

def _raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request by hand (the body may be cut short) and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except OSError:
                break  # the server answered and closed before taking the whole body: that is the point
        answer = b""
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    return answer


async def test_413_from_content_length_and_while_reading(tmp_path: Path) -> None:
    async with open_journal(tmp_path / "state") as journal, \
            receiving(journal, max_body_size="64KiB") as (source, _):
        port = int(source.addresses[0].rsplit(":", 1)[1])
        head = f"POST /v1/entries HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
        declared = await trio.to_thread.run_sync(
            _raw_exchange, port, head + b"Content-Length: 50000000\r\n\r\n", [b"[" * 1024])
        chunked = await trio.to_thread.run_sync(
            _raw_exchange, port, head + b"Transfer-Encoding: chunked\r\n\r\n",
            [b"4000\r\n" + b" " * 0x4000 + b"\r\n"] * 64)
    assert declared.startswith(b"HTTP/1.1 413") and b"connection: close" in declared
    assert b"the body (50000000 bytes) is larger than max_body_size (65536 bytes)" in declared
    assert chunked.startswith(b"HTTP/1.1 413") and b"the body is larger than max_body_size (65536" in chunked
    assert quarantined(tmp_path / "state") == []


async def test_too_many_entries_in_one_request(tmp_path: Path) -> None:
    async with open_journal(tmp_path / "state") as journal, \
            receiving(journal, max_entries_per_request=2) as (_, client):
        response = await post(client, ENTRIES)
        ndjson = await post(client, NDJSON, {"content-type": "application/x-ndjson"})
    assert response.status_code == ndjson.status_code == 413
    assert "more than max_entries_per_request (2)" in response.json()["error"]
    assert stored(tmp_path / "state") == []


async def test_a_slow_body_gets_408(tmp_path: Path) -> None:
    async with open_journal(tmp_path / "state") as journal, \
            receiving(journal, request_timeout="300ms") as (source, _):
        port = int(source.addresses[0].rsplit(":", 1)[1])
        head = f"POST /v1/entries HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n" \
               "Content-Length: 100\r\n\r\n[".encode()
        answer = await trio.to_thread.run_sync(_raw_exchange, port, head, [])
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.3s" in answer


async def test_methods_paths_and_health(tmp_path: Path) -> None:
    async with open_journal(tmp_path / "state") as journal, \
            receiving(journal, path="/workos/audit") as (_, client):
        get = await client.get("/workos/audit", headers=BEARER)
        put = await client.put("/workos/audit", content=b"[]", headers=BEARER)
        elsewhere = await post(client, ENTRIES, path="/v1/entries")
        health = await client.get("/healthz")
        head = await client.head("/healthz")
        post_health = await client.post("/healthz")
        ok = await post(client, ENTRIES, path="/workos/audit")
    assert (get.status_code, get.headers["allow"]) == (405, "POST")
    assert put.status_code == 405
    assert elsewhere.status_code == 404 and "/workos/audit" in elsewhere.json()["error"]
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert head.status_code == 200
    assert (post_health.status_code, post_health.headers["allow"]) == (405, "GET, HEAD")
    assert ok.status_code == 200


async def test_503_with_retry_after_when_the_journal_is_full_or_stopping(tmp_path: Path) -> None:
    async with open_journal(tmp_path / "full", max_size=1) as journal, receiving(journal) as (_, client):
        full = await post(client, ENTRIES)
        health = await client.get("/healthz")
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    assert "the journal is full" in full.json()["error"]
    assert health.status_code == 503
    assert stored(tmp_path / "full") == []

    async with open_journal(tmp_path / "state") as journal:
        intake = await intake_for(journal, "push")
        async with receiving(journal, intake=intake) as (_, client):
            intake.close()  # what the service does first when it stops
            stopping = await post(client, ENTRIES)
    assert stopping.status_code == 503 and int(stopping.headers["retry-after"]) >= 1


async def test_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    tls = {"cert_file": str(tmp_path / "server.pem"), "key_file": str(tmp_path / "server.pem")}
    async with open_journal(tmp_path / "state") as journal, \
            receiving(journal, tls=tls, _verify=client_context) as (source, client):
        assert source.addresses[0].startswith("https://")
        response = await post(client, ENTRIES)
        assert "with TLS" in await source.check()
    assert response.json()["accepted"] == 3


async def test_check_binds_and_names_the_problem(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        source = HttpSource(relay.Context("push", "source", tmp_path), HttpSettings.model_validate(
            {"listen": f"127.0.0.1:{port}", "auth": {"bearer_tokens": [TOKEN]}}))
        await source.open()
        with pytest.raises(relay.CheckFailed, match="Address already in use"):
            await source.check()
    assert "auth: bearer (1 token)" in await source.check()


# -- the body parser on its own ------------------------------------------------------------------------------

def test_parse_entries_shapes() -> None:
    assert parse_entries(b'{"data": {"not": "a list"}}') == [{"data": {"not": "a list"}}]
    assert parse_entries(b'{"action": "x", "data": []}') == [{"action": "x", "data": []}], "an entry, not an envelope"
    assert parse_entries(b"[]") == []
    assert parse_entries(b'{"a":1}\n\n{"b":2}\n') == [{"a": 1}, {"b": 2}]
    with pytest.raises(BodyError, match="not valid JSON: unexpected content after document"):
        parse_entries(b'{"a":1}{"b":2}')
    with pytest.raises(BodyError, match=r"NDJSON line 2 \(starting at byte 8\)"):
        parse_entries(b'{"a":1}\n[\n', "application/x-ndjson")
    with pytest.raises(BodyError, match=r"column 11 \(byte 12\)"):  # bytes, not characters
        parse_entries('{"é": "é" x}'.encode())


def test_inflate_is_bounded_and_strict() -> None:
    assert inflate(gzip.compress(b"a" * 100) + gzip.compress(b"b"), 101) == b"a" * 100 + b"b"
    with pytest.raises(BodyTooLarge):
        inflate(gzip.compress(b"a" * 102), 101)
    with pytest.raises(BodyError, match="ends before its end-of-stream marker"):
        inflate(gzip.compress(b"a" * 100)[:-8], 1000)
    with pytest.raises(BodyError, match=r"member starting at byte \d+"):
        inflate(gzip.compress(b"a") + b"garbage!", 1000)
    collector = BodyCollector(10)
    collector.feed(b"0123456789")
    with pytest.raises(BodyTooLarge):
        collector.feed(b"x")


# -- random input ---------------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=15)
_entryish = st.builds(
    lambda action, occurred, actor, extra: {**entry(), "action": action, "occurred_at": occurred, "actor": actor,
                                            **extra},
    st.text(max_size=15) | st.just("api_key.created"),
    st.sampled_from(["2024-05-14T09:30:00Z", "yesterday", "2024-13-01T00:00:00Z"]) | st.text(max_size=5),
    st.fixed_dictionaries({"type": st.sampled_from(["user", "api_key", ""]), "id": st.text(max_size=5)}) | _json,
    st.dictionaries(st.sampled_from(["targets", "context", "version", "id"]), _json, max_size=2))
_payload = st.one_of(
    st.binary(max_size=600),
    _json.map(orjson.dumps),
    st.lists(_entryish | _json, max_size=8).map(orjson.dumps),
    st.lists(_entryish | _json, min_size=1, max_size=8).map(lambda v: b"\n".join(orjson.dumps(x) for x in v)),
    st.dictionaries(st.sampled_from(["data", "events", "object"]), st.lists(_entryish, max_size=4),
                    max_size=2).map(orjson.dumps),
)
_request = st.fixed_dictionaries({
    "auth": st.sampled_from(["valid", "valid", "valid", "missing", "wrong", "basic", "empty"]),
    "payload": _payload,
    "encoding": st.sampled_from(["", "", "gzip", "gzip-lie", "deflate"]),
    "content_type": st.sampled_from(["application/json", "application/x-ndjson", "text/plain", ""]),
    "chunk": st.integers(1, 700),
    "full": st.sampled_from([False, False, False, True]),
})
_AUTH = {"valid": f"Bearer {TOKEN}", "wrong": "Bearer guess", "basic": "Basic Zm9vOmJhcg==", "empty": "Bearer "}


async def _call(source: HttpSource, switch: FullableIntake, case: dict[str, Any]) -> tuple[int, bytes]:
    body = case["payload"]
    if case["encoding"] == "gzip":
        body = gzip.compress(body)
    headers = [(b"content-type", case["content_type"].encode())]
    if case["encoding"]:
        headers.append((b"content-encoding", b"gzip" if case["encoding"] == "gzip-lie" else
                        case["encoding"].encode()))
    if case["auth"] != "missing":
        headers.append((b"authorization", _AUTH[case["auth"]].encode()))
    chunks = [body[i:i + case["chunk"]] for i in range(0, len(body), case["chunk"])] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    switch.full = case["full"]
    scope = {"type": "http", "method": "POST", "path": "/v1/entries", "headers": headers,
             "client": ("127.0.0.1", 40000), "query_string": b""}
    await source.app(scope, receive, send)
    return sent[0]["status"], sent[1]["body"]


def _counts(state: Path) -> tuple[int, int]:
    return len(stored(state)), len(quarantined(state))


def test_random_input_never_crashes_never_5xx_never_stores_unauthenticated(tmp_path: Path) -> None:
    state = tmp_path / "state"

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
    @given(case=_request)
    def one_request(source: HttpSource, switch: FullableIntake, case: dict[str, Any]) -> None:
        before = _counts(state)
        status, body = trio.from_thread.run(_call, source, switch, case)
        after = _counts(state)
        answer = orjson.loads(body)
        authenticated = case["auth"] == "valid"
        assert status < 500 or (status == 503 and case["full"] and authenticated), (status, answer)
        if not authenticated:
            assert status in (401, 403) and after == before, "unauthenticated input is never stored"
        elif status == 200:
            assert after == (before[0] + answer["accepted"], before[1] + answer["quarantined"])
        elif status == 400:
            kept = 0 if case["payload"] == b"" and case["encoding"] != "gzip" else 1  # nothing to keep
            assert after == (before[0], before[1] + kept), "an unreadable body is kept in quarantine"
        else:
            assert status in (413, 415, 503) and after == before, (status, answer)

    async def main() -> None:
        async with open_journal(state) as journal:
            switch = FullableIntake(await intake_for(journal, "push"))
            source = HttpSource(context_for(journal, "push"), HttpSettings.model_validate(
                {"listen": "127.0.0.1:0", "auth": {"bearer_tokens": [TOKEN]}, "max_body_size": "4KiB",
                 "max_entries_per_request": 6}))
            await source.open()
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run, switch)
                await trio.to_thread.run_sync(lambda: one_request(source, switch))
                nursery.cancel_scope.cancel()

    trio.run(main)


# -- a 200 means journaled: kill -9 right after the answer ---------------------------------------------------

def test_a_200_means_the_entries_survive_kill_9(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    config = write_config(tmp_path / "relay.yaml", config_dict(tmp_path, sources={"push": {
        "type": "http", "listen": f"127.0.0.1:{port}", "auth": {"bearer_tokens": [TOKEN]}}}, destinations={}))
    relay_process = RelayProcess(config, tmp_path / "relay.log")
    acknowledged: list[bytes] = []
    lock = threading.Lock()
    serial = iter(range(10**9))

    def client(killed: threading.Event, kill_at: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=BEARER, timeout=10) as http:
            while not killed.is_set():
                with lock:
                    batch = [entry("user.created", n=next(serial)) for _ in range(20)]
                try:
                    response = http.post("/v1/entries", content=orjson.dumps(batch))
                except httpx.HTTPError:
                    return  # the relay is gone: this batch was never acknowledged
                assert response.status_code == 200, response.text
                with lock:
                    acknowledged.extend(orjson.dumps(e) for e in batch)
                    if len(acknowledged) >= kill_at and not killed.is_set():
                        relay_process.kill()  # right after this answer, while other requests are in flight
                        killed.set()

    try:
        for round_ in range(3):
            relay_process.start()
            killed = threading.Event()
            threads = [threading.Thread(target=client, args=(killed, len(acknowledged) + 200 + 100 * round_))
                       for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert killed.is_set(), relay_process.log_text()[-2000:]
            journaled = set(stored(state))
            missing = [a for a in acknowledged if a not in journaled]
            assert not missing, f"round {round_}: {len(missing)} acknowledged entries are not in the journal"
    finally:
        relay_process.stop_quietly()
    assert len(acknowledged) >= 600


# -- the README's example --------------------------------------------------------------------------------------

async def test_the_readme_curl_example_against_the_demo_configuration(tmp_path: Path) -> None:
    """examples/demo.yaml with its state moved to tmp_path, and the body of the README's curl command."""
    demo = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    demo.update(state_dir=str(tmp_path / "state"), metrics={"listen": None})
    demo["sources"]["push"]["listen"] = "127.0.0.1:0"
    demo["destinations"]["output"]["path"] = str(tmp_path / "output.jsonl")
    readme = (ROOT / "README.md").read_text()
    body = re.search(r"curl -sS http://127\.0\.0\.1:8088/v1/entries.*?--data '(.*?)'\n", readme, re.S)
    assert body is not None, "the README has the curl example"
    async with running_relay(make_config(demo)) as service:
        token = (tmp_path / "state" / "push.token").read_text().splitlines()[-1]
        assert stat.S_IMODE((tmp_path / "state" / "push.token").stat().st_mode) == 0o600
        source = service.sources["push"].source
        assert isinstance(source, HttpSource)
        async with httpx.AsyncClient(base_url=source.addresses[0]) as client:
            response = await client.post("/v1/entries", content=body.group(1).encode(),
                                         headers={"authorization": f"Bearer {token}",
                                                  "content-type": "application/json"})
        assert response.json() == {"accepted": 1, "duplicates": 0, "quarantined": 0}
        output = tmp_path / "output.jsonl"
        await wait_until(lambda: output.exists() and b"my first pushed entry" in output.read_bytes(), 30,
                         "the pushed entry in the output file")
