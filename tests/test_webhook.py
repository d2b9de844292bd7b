"""Destination `webhook` against a real HTTP receiver (hypercorn on 127.0.0.1, `tests/webhook_receiver.py`).

Signatures are checked by the `standardwebhooks` package, not by the relay's code. The plugin is tested
directly (one `send()` at a time) and through the whole relay (journal, delivery loop, dead letters).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trustme

import relay
from relay.config import Config
from relay.context import MemoryStateStore
from relay.logs import configure_logging
from relay.service import Service
from relay_plugins import webhook
from relay_plugins.webhook import WebhookDestination, WebhookSettings
from tests import scripted
from tests.helpers import ROOT, config_dict, dead_letters, make_config, metric_value, running_relay, wait_until
from tests.webhook_receiver import POISON, Answer, Receiver, start_receiver, verify_from_spec

BEARER = "bearer-6d1f0c2a-token"
HEADER_SECRET = "hdr-4b7e-secret-value"
PASSWORD = "basic-pass-91c3"
OLD_SECRET = "whsec_" + base64.b64encode(b"old signing key, 32 bytes long!!").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"new signing key for the rotation").decode()
WRONG_SECRET = "whsec_" + base64.b64encode(b"a key the relay has never seen!!").decode()
ENV = {"WEBHOOK_TOKEN": BEARER, "API_KEY": HEADER_SECRET, "SIGNING_OLD": OLD_SECRET, "SIGNING_NEW": NEW_SECRET}
SECRETS = [BEARER, HEADER_SECRET, PASSWORD, OLD_SECRET, NEW_SECRET, OLD_SECRET.removeprefix("whsec_")]


def audit_entry(i: int, poison: bool = False) -> dict[str, Any]:
    """A valid incident.io audit entry; `poison` makes the receiver refuse it."""
    return {
        "action": "api_key.created", "version": 1,
        "occurred_at": f"2024-05-14T09:{i // 60 % 60:02d}:{i % 60:02d}.000000Z",
        "actor": {"type": "user", "id": f"01G0J1EXE7AXZ2C93K61WB{i:04d}", "name": "Kelsey Mills",
                  "metadata": {"user_base_role_slug": "admin"}},
        "targets": [{"type": "api_key", "id": f"01FCNDV6P870EA6S7TK1DS{i:04d}",
                     "name": POISON if poison else f"CI key {i}"}],
        "context": {"location": "192.0.2.10", "user_agent": "curl/8.5.0"},
    }


def make_batch(values: list[dict[str, Any]], first_seq: int = 1, name: str = "hook") -> relay.Batch:
    entries = [relay.Entry(first_seq + i, orjson.dumps(v), 1715679000.0 + i, v["action"])
               for i, v in enumerate(values)]
    return relay.Batch(name, first_seq, first_seq + len(entries) - 1, entries)


def rest_of(batch: relay.Batch, start: int) -> relay.Batch:
    """The batch the delivery loop re-sends after `Rejected(resend_from=start)`."""
    rest = batch.entries[start:]
    return relay.Batch(batch.destination, rest[0].seq, batch.last_seq, rest, batch.attributes)


@asynccontextmanager
async def destination(tmp_path: Path, url: str, name: str = "hook", state: relay.StateStore | None = None,
                      **settings: Any) -> AsyncIterator[WebhookDestination]:
    context = relay.Context(name, "destination", tmp_path, state or MemoryStateStore())
    dest = WebhookDestination(context, WebhookSettings.model_validate({"url": url, **settings}))
    await dest.open()
    try:
        yield dest
    finally:
        await dest.close()


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    return await start_receiver(nursery)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line (JSON, debug level) written while the test runs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# -- signing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["json_array", "ndjson", "json"])
async def test_signatures_verify_with_the_standardwebhooks_package(
        tmp_path: Path, receiver: Receiver, encoding: str) -> None:
    receiver.verifiers = {"old": OLD_SECRET}
    values = [audit_entry(i) for i in range(5)]
    async with destination(tmp_path, receiver.url, encoding=encoding, signing_secrets=[OLD_SECRET]) as dest:
        assert await dest.send(make_batch(values)) == relay.Delivered()
    requests = receiver.deliveries()
    assert len(requests) == (5 if encoding == "json" else 1)
    assert all(r.verified_by == ["old"] for r in requests)
    assert receiver.processed_entries() == values
    for r in requests:
        assert r.headers["idempotency-key"] == r.id
        assert r.id.startswith("msg_")
        assert r.headers["content-type"] == ("application/x-ndjson" if encoding == "ndjson" else "application/json")
    if encoding == "json":
        assert [json.loads(r.raw) for r in requests] == values


async def test_two_secrets_during_rotation_each_verify_alone(tmp_path: Path, receiver: Receiver) -> None:
    receiver.verifiers = {"old": OLD_SECRET, "new": NEW_SECRET}
    async with destination(tmp_path, receiver.url, signing_secrets=[OLD_SECRET, NEW_SECRET]) as dest:
        assert await dest.send(make_batch([audit_entry(1)])) == relay.Delivered()
    (request,) = receiver.deliveries()
    assert request.verified_by == ["old", "new"]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    # The verifier can fail: a secret the relay does not have does not verify.
    assert not verify_from_spec(WRONG_SECRET, request.headers, request.raw)


async def test_a_receiver_with_another_secret_refuses_and_the_destination_halts(
        tmp_path: Path, receiver: Receiver) -> None:
    receiver.verifiers = {"wrong": WRONG_SECRET}
    async with destination(tmp_path, receiver.url, signing_secrets=[OLD_SECRET]) as dest:
        result = await dest.send(make_batch([audit_entry(1)]))
    assert isinstance(result, relay.Halted)
    assert "HTTP 401 Unauthorized" in result.reason
    assert not receiver.processed


async def test_gzip_is_signed_over_the_compressed_bytes(tmp_path: Path, receiver: Receiver) -> None:
    receiver.verifiers = {"old": OLD_SECRET}
    values = [audit_entry(i) for i in range(20)]
    async with destination(tmp_path, receiver.url, encoding="ndjson", compression="gzip",
                           signing_secrets=[OLD_SECRET]) as dest:
        assert await dest.send(make_batch(values)) == relay.Delivered()
    (request,) = receiver.deliveries()
    assert request.headers["content-encoding"] == "gzip"
    assert request.verified_by == ["old"]
    assert not verify_from_spec(OLD_SECRET, request.headers, gzip.decompress(request.raw))
    assert receiver.processed_entries() == values


# -- idempotency ids --------------------------------------------------------------------------------------

async def test_a_retry_and_a_restart_carry_the_same_id(tmp_path: Path, receiver: Receiver) -> None:
    receiver.script.extend([Answer(500, b"database unavailable")])
    batch = make_batch([audit_entry(i) for i in range(3)], first_seq=41)
    async with destination(tmp_path, receiver.url) as dest:
        first = await dest.send(batch)
        assert isinstance(first, relay.RetryLater)
        assert "HTTP 500 Internal Server Error: database unavailable" in first.reason
        assert await dest.send(batch) == relay.Delivered()
    async with destination(tmp_path, receiver.url) as restarted:  # a new process: nothing kept in memory
        assert await restarted.send(batch) == relay.Delivered()
    ids = [r.id for r in receiver.deliveries()]
    assert len(ids) == 3 and len(set(ids)) == 1
    assert receiver.duplicates == 1
    assert receiver.processed_entries() == [e.value() for e in batch.entries]
    timestamps = [int(r.headers["webhook-timestamp"]) for r in receiver.deliveries()]
    assert all(abs(t - timestamps[0]) < 300 for t in timestamps)


async def test_ids_differ_by_destination_boundaries_and_content(tmp_path: Path, receiver: Receiver) -> None:
    values = [audit_entry(i) for i in range(2)]
    async with destination(tmp_path, receiver.url, name="a") as a, \
               destination(tmp_path, receiver.url, name="b") as b:
        await a.send(make_batch(values, first_seq=1))
        await b.send(make_batch(values, first_seq=1))
        await a.send(make_batch(values, first_seq=7))
        # Same positions, other content (drop_fields changed between a crash and the re-send): a new id.
        await a.send(make_batch([values[1], values[0]], first_seq=1))
    ids = [r.id for r in receiver.deliveries()]
    assert len(set(ids)) == 4


async def test_json_sends_one_request_per_entry_with_its_own_stable_id(
        tmp_path: Path, receiver: Receiver) -> None:
    batch = make_batch([audit_entry(i) for i in range(4)])
    async with destination(tmp_path, receiver.url, encoding="json") as dest:
        assert await dest.send(batch) == relay.Delivered()
        # The same entries in a differently cut batch (as after a partial delivery) keep their ids.
        assert await dest.send(rest_of(batch, 2)) == relay.Delivered()
    ids = [r.id for r in receiver.deliveries()]
    assert len(set(ids[:4])) == 4
    assert ids[4:] == ids[2:4]
    assert receiver.duplicates == 2


async def test_many_requests_report_progress_instead_of_outlasting_send_timeout(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook, "CHECKPOINT", 0.0)
    batch = make_batch([audit_entry(i) for i in range(3)])
    async with destination(tmp_path, receiver.url, encoding="json") as dest:
        assert await dest.send(batch) == relay.Rejected({}, resend_from=1)
    assert len(receiver.deliveries()) == 1


# -- answers ----------------------------------------------------------------------------------------------

async def test_429_is_retried_after_the_servers_retry_after(tmp_path: Path, receiver: Receiver) -> None:
    receiver.script.append(Answer(429, b"slow down", (("Retry-After", "7"),)))
    async with destination(tmp_path, receiver.url) as dest:
        result = await dest.send(make_batch([audit_entry(1)]))
    assert result == relay.RetryLater(f"POST {receiver.url}: HTTP 429 Too Many Requests: slow down", 7.0)


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_retried(tmp_path: Path, receiver: Receiver, status: int) -> None:
    receiver.always = Answer(status)
    async with destination(tmp_path, receiver.url) as dest:
        result = await dest.send(make_batch([audit_entry(1)]))
    assert isinstance(result, relay.RetryLater)
    assert f"HTTP {status} " in result.reason
    assert result.after is None


@pytest.mark.parametrize(("status", "phrase"), [
    (401, "Unauthorized"), (403, "Forbidden"), (404, "Not Found"), (405, "Method Not Allowed"), (410, "Gone"),
    (415, "Unsupported Media Type"),
])
async def test_configuration_statuses_halt_with_status_and_phrase(
        tmp_path: Path, receiver: Receiver, status: int, phrase: str) -> None:
    receiver.always = Answer(status, b'{"error": "nope"}')
    async with destination(tmp_path, receiver.url) as dest:
        result = await dest.send(make_batch([audit_entry(1)]))
    assert result == relay.Halted(f"POST {receiver.url}: HTTP {status} {phrase}: {{\"error\": \"nope\"}}")


async def test_network_errors_are_retried(tmp_path: Path, receiver: Receiver) -> None:
    async with destination(tmp_path, "http://127.0.0.1:9/hooks/secret-path") as dest:
        result = await dest.send(make_batch([audit_entry(1)]))
    assert isinstance(result, relay.RetryLater)
    assert result.reason.startswith("POST http://127.0.0.1:9: ConnectError")
    assert "secret-path" not in result.reason


# -- refused entries: split until isolated ----------------------------------------------------------------

async def test_a_poisoned_entry_is_isolated_and_the_rest_delivered_once(
        tmp_path: Path, receiver: Receiver, captured_logs: io.StringIO) -> None:
    values = [audit_entry(i, poison=(i == 11)) for i in range(16)]
    batch = make_batch(values)
    async with destination(tmp_path, receiver.url, auth={"bearer_token": BEARER}) as dest:
        result = await dest.send(batch)
    assert isinstance(result, relay.Rejected)
    assert result.resend_from is None
    assert list(result.reasons) == [11]
    assert result.reasons[11] == ('HTTP 413 Payload Too Large: {"error": "entry too large", '
                                  '"auth_seen": "Bearer ********"}')
    assert sorted(receiver.processed_entries(), key=lambda v: v["targets"][0]["id"]) == \
        [v for i, v in enumerate(values) if i != 11]
    assert receiver.duplicates == 0
    # Every sub-request has its own stable id: the same split again is deduplicated entirely.
    ids = [r.id for r in receiver.deliveries()]
    assert len(ids) == len(set(ids))
    assert "webhook_batch_split" in captured_logs.getvalue()
    assert BEARER not in captured_logs.getvalue()


async def test_an_entry_too_large_on_its_own_is_rejected(tmp_path: Path, receiver: Receiver) -> None:
    receiver.always = Answer(413, b"x" * 5000)
    async with destination(tmp_path, receiver.url) as dest:
        result = await dest.send(make_batch([audit_entry(1)]))
    assert isinstance(result, relay.Rejected)
    assert result.reasons[0] == "HTTP 413 Payload Too Large: " + "x" * 1024 + "…"


async def test_a_retryable_answer_mid_split_keeps_progress_and_backs_off(
        tmp_path: Path, receiver: Receiver) -> None:
    values = [audit_entry(i, poison=(i == 5)) for i in range(8)]
    batch = make_batch(values, first_seq=100)
    # [0,8) 413 · [0,4) 200 · [4,8) 413 · [4,6) 503: entries 0-3 are settled when the receiver fails.
    receiver.script.extend([None, None, None, Answer(503, b"", (("Retry-After", "30"),))])
    async with destination(tmp_path, receiver.url) as dest:
        assert await dest.send(batch) == relay.Rejected({}, resend_from=4)
        rest = rest_of(batch, 4)
        backing_off = await dest.send(rest)
        assert isinstance(backing_off, relay.RetryLater)
        assert backing_off.after is not None and 0 < backing_off.after <= 30
        assert len(receiver.deliveries()) == 4  # no request made while backing off
        result = await dest.send(rest)
    assert isinstance(result, relay.Rejected)
    assert list(result.reasons) == [1]  # entry 5 of the batch is entry 1 of the rest
    assert result.reasons[1].startswith("HTTP 413 Payload Too Large")
    assert sorted(v["targets"][0]["id"] for v in receiver.processed_entries()) == \
        sorted(v["targets"][0]["id"] for i, v in enumerate(values) if i != 5)
    assert receiver.duplicates == 0


@pytest.mark.parametrize("restart", [False, True])
async def test_a_range_that_failed_mid_split_is_sent_again_as_it_was(
        tmp_path: Path, receiver: Receiver, restart: bool) -> None:
    """The receiver took [2,4) but its proxy answered 502: [2,4) must come back with the same id."""
    values = [audit_entry(i, poison=i in (1, 6)) for i in range(8)]
    batch = make_batch(values, first_seq=10)
    # [0,8) 413 · [0,4) 413 · [0,2) 413 · [0,1) 200 · [1,2) 413 · [2,4) taken, then 502
    receiver.script.extend([None] * 5 + [Answer(502, b"bad gateway", processed=True)])
    state = MemoryStateStore()
    async with destination(tmp_path, receiver.url, state=state) as dest:
        first = await dest.send(batch)
        assert isinstance(first, relay.Rejected) and first.resend_from == 2 and list(first.reasons) == [1]
        failed_id = receiver.deliveries()[-1].id
        rest = rest_of(batch, 2)
        if not restart:
            assert isinstance(await dest.send(rest), relay.RetryLater)  # backs off first, no request
            assert len(receiver.deliveries()) == 6
            result = await dest.send(rest)
    if restart:
        async with destination(tmp_path, receiver.url, state=state) as restarted:
            result = await restarted.send(rest)
    assert receiver.deliveries()[6].id == failed_id
    assert isinstance(result, relay.Rejected)
    assert result.resend_from is None and list(result.reasons) == [4]
    assert receiver.duplicates == 1
    taken = sorted(v["targets"][0]["name"] for v in receiver.processed_entries())
    assert taken == sorted(f"CI key {i}" for i in range(8) if i not in (1, 6))


# -- redirects and TLS ------------------------------------------------------------------------------------

async def test_redirects_are_not_followed_by_default(tmp_path: Path, receiver: Receiver) -> None:
    receiver.redirects["/old"] = Answer(308, headers=(("Location", "/new"),))
    async with destination(tmp_path, f"{receiver.url}/old") as dest:
        result = await dest.send(make_batch([audit_entry(1)]))
    assert isinstance(result, relay.Halted)
    assert "HTTP 308 Permanent Redirect" in result.reason
    assert "follow_redirects" in result.reason
    assert not receiver.processed


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_followed_redirects_keep_method_body_and_signature(
        tmp_path: Path, receiver: Receiver, status: int) -> None:
    receiver.verifiers = {"old": OLD_SECRET}
    receiver.expect_authorization = f"Bearer {BEARER}"
    receiver.redirects["/old"] = Answer(status, headers=(("Location", "/new"),))
    async with destination(tmp_path, f"{receiver.url}/old", follow_redirects=True, method="PUT",
                           auth={"bearer_token": BEARER}, signing_secrets=[OLD_SECRET]) as dest:
        assert await dest.send(make_batch([audit_entry(1)])) == relay.Delivered()
    final = receiver.requests[-1]
    assert (final.method, final.path, final.verified_by) == ("PUT", "/new", ["old"])


async def test_a_redirect_to_another_host_drops_the_credentials(tmp_path: Path, receiver: Receiver) -> None:
    other = receiver.url.replace("127.0.0.1", "localhost")
    receiver.redirects["/old"] = Answer(307, headers=(("Location", f"{other}/new"),))
    async with destination(tmp_path, f"{receiver.url}/old", follow_redirects=True,
                           auth={"basic": {"username": "relay", "password": PASSWORD}},
                           headers={"X-Api-Key": HEADER_SECRET}) as dest:
        assert await dest.send(make_batch([audit_entry(1)])) == relay.Delivered()
    first, final = receiver.requests
    assert first.headers["x-api-key"] == HEADER_SECRET and "authorization" in first.headers
    assert "x-api-key" not in final.headers and "authorization" not in final.headers
    assert final.headers["webhook-id"] == first.headers["webhook-id"]


async def test_tls_with_a_private_ca(tmp_path: Path, nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    tls_receiver = await start_receiver(nursery, cert_file=str(cert_file), key_file=str(cert_file))
    url = tls_receiver.url.replace("http://", "https://")
    async with destination(tmp_path, url) as untrusting:
        refused = await untrusting.send(make_batch([audit_entry(1)]))
    assert isinstance(refused, relay.Halted)
    assert "TLS certificate was not accepted" in refused.reason
    async with destination(tmp_path, url, tls={"ca_file": str(ca_file)}) as trusting:
        assert await trusting.send(make_batch([audit_entry(1)])) == relay.Delivered()
        assert (await trusting.check()).startswith(f"OPTIONS {url}: HTTP 204")
    assert len(tls_receiver.processed) == 1


# -- the receiver-side snippet in docs/webhook.md ---------------------------------------------------------

def _docs_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The Python handler from docs/webhook.md, run as a reader would copy it (its database in tmp_path)."""
    text = (ROOT / "docs" / "webhook.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "def handle(" in block)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/webhook.md", "exec"), namespace)
    return namespace


async def test_the_receiver_snippet_in_the_docs_verifies_and_dedupes(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs_receiver(tmp_path, monkeypatch)
    docs["SECRETS"] = [NEW_SECRET]
    async with destination(tmp_path, receiver.url, encoding="ndjson", compression="gzip",
                           signing_secrets=[OLD_SECRET, NEW_SECRET]) as dest:
        assert await dest.send(make_batch([audit_entry(i) for i in range(3)])) == relay.Delivered()
    async with destination(tmp_path, receiver.url, signing_secrets=[NEW_SECRET]) as dest:
        assert await dest.send(make_batch([audit_entry(i) for i in range(3, 5)], first_seq=4)) == relay.Delivered()
    gzipped, plain = receiver.deliveries()
    try:
        assert docs["handle"](gzipped.headers, gzipped.raw) == 200
        assert docs["handle"](plain.headers, plain.raw) == 200
        assert docs["handle"](gzipped.headers, gzipped.raw) == 200  # a retry: accepted, not stored again
        assert docs["db"].execute("SELECT count(*) FROM audit").fetchone() == (5,)
        assert docs["handle"](plain.headers, plain.raw.replace(b"CI key 3", b"CI key 9")) == 401
        middle = len(gzipped.raw) // 2
        flipped = gzipped.raw[:middle] + bytes([gzipped.raw[middle] ^ 1]) + gzipped.raw[middle + 1:]
        assert docs["handle"](gzipped.headers, flipped) == 401
        docs["SECRETS"] = [WRONG_SECRET]
        assert docs["handle"](plain.headers, plain.raw) == 401
    finally:
        docs["db"].close()


# -- check ------------------------------------------------------------------------------------------------

async def test_check_reports_the_status(tmp_path: Path, receiver: Receiver) -> None:
    async with destination(tmp_path, receiver.url) as dest:
        assert await dest.check() == f"OPTIONS {receiver.url}: HTTP 204 No Content"
        receiver.options_status = 405
        assert await dest.check() == f"HEAD {receiver.url}: HTTP 200 OK"
        receiver.always = Answer(401)
        with pytest.raises(relay.CheckFailed, match="credentials refused: HTTP 401 Unauthorized"):
            await dest.check()
    async with destination(tmp_path, "http://127.0.0.1:9") as unreachable:
        with pytest.raises(relay.CheckFailed, match="ConnectError"):
            await unreachable.check()


# -- settings ---------------------------------------------------------------------------------------------

def _config(destination_settings: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None) -> Config:
    return make_config(config_dict(tmp_path, None, {"hook": {"type": "webhook", **destination_settings}}),
                       env=env or {})


@pytest.mark.parametrize(("settings", "message"), [
    ({"url": "ftp://example.com"}, "must be an http:// or https:// URL"),
    ({"url": "https://user:pw@example.com"}, "put credentials under auth.basic"),
    ({"url": "https://x.example", "signing_secrets": ["not-whsec-0123456789"]}, "written whsec_"),
    ({"url": "https://x.example", "signing_secrets": ["whsec_c2hvcnQ="]}, "24 to 64 bytes"),
    ({"url": "https://x.example", "auth": {}}, "exactly one of auth.bearer_token or auth.basic"),
    ({"url": "https://x.example", "headers": {"Idempotency-Key": "abcd"}}, "set by the relay"),
    ({"url": "https://x.example", "headers": {"Authorization": "abcd"}, "auth": {"bearer_token": "abcd"}},
     "either under headers or with auth"),
    ({"url": "https://x.example", "tls": {"verify": False, "ca_file": "/ca.pem"}}, "no effect"),
])
def test_settings_errors_are_clear_and_secret_free(tmp_path: Path, settings: dict[str, Any], message: str
                                                   ) -> None:
    with pytest.raises(relay.ConfigError) as caught:
        _config(settings, tmp_path)
    text = str(caught.value)
    assert message in text
    assert "not-whsec-0123456789" not in text and "c2hvcnQ=" not in text


def test_header_values_are_secrets(tmp_path: Path) -> None:
    config = _config({"url": "https://x.example", "headers": {"X-Api-Key": "${KEY}"}, "method": "put"},
                     tmp_path, env={"KEY": HEADER_SECRET})
    settings = config.destinations["hook"].settings
    assert settings.method == "PUT"
    assert HEADER_SECRET not in repr(settings) and HEADER_SECRET not in str(settings.model_dump())


# -- through the whole relay ------------------------------------------------------------------------------

def _relay_config(tmp_path: Path, url: str) -> Config:
    hook = {"type": "webhook", "url": url, "auth": {"bearer_token": "${WEBHOOK_TOKEN}"},
            "headers": {"X-Api-Key": "${API_KEY}"}, "signing_secrets": ["${SIGNING_OLD}", "${SIGNING_NEW}"],
            "encoding": "ndjson", "batch": {"max_entries": 16, "max_wait": "10ms"},
            "retry": {"initial_backoff": "10ms", "max_backoff": "50ms"}}
    data = config_dict(tmp_path, {"in": {"type": "manual"}}, {"hook": hook}, shutdown_timeout="200ms")
    return make_config(data, extra=[scripted], env=ENV)


async def _submit(service: Service, values: list[dict[str, Any]]) -> None:
    result = await service.sources["in"].intake.submit(values)
    assert result.accepted == len(values)


async def test_through_the_relay_retries_dedupes_and_dead_letters_the_poisoned_entry(
        tmp_path: Path, receiver: Receiver, captured_logs: io.StringIO) -> None:
    receiver.verifiers = {"old": OLD_SECRET, "new": NEW_SECRET}
    receiver.expect_authorization = f"Bearer {BEARER}"
    receiver.script.extend([Answer(429, b"", (("Retry-After", "1"),)), Answer(500, b"try again")])
    config = _relay_config(tmp_path, receiver.url)
    async with running_relay(config) as service:
        await _submit(service, [audit_entry(i, poison=(i == 21)) for i in range(40)])
        loop = service.destinations["hook"].loop
        await receiver.wait_for(lambda: len(receiver.processed_entries()) == 39, "39 entries")
        await wait_until(lambda: loop.offset == 40, what="the offset to reach the last entry")
    first_batch = receiver.deliveries()[:3]
    assert [r.status for r in first_batch] == [429, 500, 200]
    assert len({r.id for r in first_batch}) == 1
    assert all(r.verified_by == ["old", "new"] for r in receiver.deliveries())
    names = [v["targets"][0]["name"] for v in receiver.processed_entries()]
    assert sorted(names) == sorted(f"CI key {i}" for i in range(40) if i != 21)
    dead = dead_letters(config.state_dir, "hook")
    assert [(seq, json.loads(data)["targets"][0]["name"]) for seq, _, data in dead] == [(22, POISON)]
    assert dead[0][1] == 'HTTP 413 Payload Too Large: {"error": "entry too large", "auth_seen": "Bearer ********"}'
    logs = captured_logs.getvalue()
    assert "entries_dead_lettered" in logs and "webhook_batch_split" in logs and "destination_retrying" in logs
    for secret in SECRETS:
        assert secret not in logs
    assert metric_value("audit_relay_webhook_requests_total", destination="hook", status_class="4xx") >= 1
    assert metric_value("audit_relay_webhook_requests_total", destination="hook", status_class="2xx") >= 3
    assert metric_value("audit_relay_webhook_request_duration_seconds_count", destination="hook") >= 5


async def test_through_the_relay_401_halts_and_keeps_every_entry(tmp_path: Path, receiver: Receiver,
                                                                 captured_logs: io.StringIO) -> None:
    receiver.always = Answer(401, b'{"error": "token revoked"}')
    config = _relay_config(tmp_path, receiver.url)
    async with running_relay(config) as service:
        await _submit(service, [audit_entry(i) for i in range(5)])
        loop = service.destinations["hook"].loop
        await receiver.wait_for(lambda: len(receiver.deliveries()) >= 1, "a request")
        await wait_until(lambda: loop.state == "halted", what="the destination to halt")
        assert loop.reason == f'POST {receiver.url}: HTTP 401 Unauthorized: {{"error": "token revoked"}}'
        assert loop.offset == 0
    assert not dead_letters(config.state_dir, "hook")
    logs = captured_logs.getvalue()
    assert "destination_halted" in logs
    for secret in SECRETS:
        assert secret not in logs


async def test_through_the_relay_a_restart_resends_with_the_same_id(tmp_path: Path, receiver: Receiver) -> None:
    receiver.always = Answer(503, b"maintenance")
    config = _relay_config(tmp_path, receiver.url)
    async with running_relay(config) as service:
        await _submit(service, [audit_entry(i) for i in range(3)])
        await receiver.wait_for(lambda: len(receiver.deliveries()) >= 2, "two attempts")
    before = {r.id for r in receiver.deliveries()}
    assert len(before) == 1
    receiver.always = None
    async with running_relay(config):
        await receiver.wait_for(lambda: len(receiver.processed_entries()) == 3, "the entries after restart")
    assert set(receiver.processed) == before
