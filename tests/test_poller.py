"""Source `poll` against a fake paginated API (tests/fakes/paged_api.py) in incident.io's conventions.

Most tests run the API in-process (httpx's ASGI transport) on virtual time, so backoffs, rate limits and
poll intervals take no real time; one runs it over loopback HTTP, and one kills the relay process with
SIGKILL between pages.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from pydantic import ValidationError
from structlog.testing import capture_logs

import relay
from relay import asgi
from relay.journal import Journal
from relay_plugins.poller import Halt, Page, PollSettings, PollSource, Position, Retry
from tests.fakes.paged_api import PagedApi, _cursor
from tests.helpers import RelayProcess, config_dict, entry, free_port, wait_until_sync, write_config
from tests.journal_harness import FullableIntake, context_for, cursor, intake_for, open_journal, stored

URL = "http://api.test/v1/audit_logs"


def entries(n: int, start: int = 0) -> list[dict[str, Any]]:
    """`n` distinct entries, one second apart, oldest first."""
    return [entry("user.created", occurred_at=f"2024-05-14T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:"
                                              f"{i % 60:02d}.000000Z", id_hint=str(i))
            for i in range(start, start + n)]


def settings(**overrides: Any) -> PollSettings:
    return PollSettings.model_validate({"url": URL, "auth": {"bearer_token": "test-api-key"}, "page_size": 100,
                                        **overrides})


@asynccontextmanager
async def polling(journal: Journal, api: Any, name: str = "api", intake: Any = None,
                  **overrides: Any) -> AsyncIterator[PollSource]:
    """A poll source running against `api` until the block ends (then cancelled, like a crash)."""
    source = PollSource(context_for(journal, name), settings(**overrides))
    source.transport = httpx.ASGITransport(app=api)
    await source.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, intake or await intake_for(journal, name))
            yield source
            nursery.cancel_scope.cancel()
    finally:
        await source.close()


def position(state_dir: Path, name: str = "api") -> Position:
    text = cursor(state_dir, name)
    assert text is not None
    return Position.decode(text)


async def test_pages_with_after_then_polls_from_the_newest_entry(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(250))
    state = tmp_path / "state"
    async with open_journal(state) as journal, polling(journal, api) as source:
        await source.wait_state("waiting")
        first_poll = [r.get("after") for r in api.requests]
        assert first_poll == [None, _cursor(100), _cursor(200)]
        assert all(r["page_size"] == "100" for r in api.requests)
        assert "occurred_at[gte]" not in api.requests[0], "start_at: oldest asks for everything"
        assert position(state) == Position(None, None, "2024-05-14T00:04:09.000000Z")

        api.entries += entries(20, start=250)
        await api.wait_requests(4)
        await source.wait_state("waiting")
        assert api.requests[3]["occurred_at[gte]"] == "2024-05-14T00:04:09.000000Z"
        assert "after" not in api.requests[3]
    journaled = stored(state)
    assert len(journaled) == len(set(journaled)) == 270, "every entry once; the re-read boundary entry deduped"
    assert {orjson.loads(d)["id_hint"] for d in journaled} == {str(i) for i in range(270)}


async def test_429_waits_for_incident_io_rate_limit_retry_after(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(150), faults=["", "429"], retry_after=40)
    async with open_journal(tmp_path / "state") as journal, polling(journal, api) as source:
        await source.wait_state("backoff")
        assert source.reason is not None and "rate limited (429)" in source.reason
        assert "exponential backoff" in source.reason, "the API's own message is in the reason"
        await source.wait_state("waiting")
    limited, retried = api.requests[1], api.requests[2]
    assert limited["_status"] == "429" and retried["_status"] == "200"
    assert retried["after"] == limited["after"] == _cursor(100), "the same page is asked for again"
    waited = float(retried["_at"]) - float(limited["_at"])
    assert waited >= 38, f"retried after {waited:.1f}s although rate_limit.retry_after said 40s"
    assert len(stored(tmp_path / "state")) == 150


async def test_server_errors_back_off_and_the_cursor_holds(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(300), faults=["", "500", "502", "429-header", "500"])
    state = tmp_path / "state"
    with capture_logs() as logs:
        async with open_journal(state) as journal, polling(journal, api) as source:
            await source.wait_state("waiting")
    assert [r["_status"] for r in api.requests] == ["200", "500", "502", "429", "500", "200", "200"]
    assert {r.get("after") for r in api.requests[1:6]} == {_cursor(100)}
    assert len(stored(state)) == len(set(stored(state))) == 300
    states = [(e["state"], e.get("reason", "")) for e in logs if e["event"] == "poll_state"]
    assert ("backoff", "http://api.test/v1/audit_logs answered 500: Something went wrong") in states
    assert any(e["event"] == "poll_state" and e["state"] == "polling" and e["log_level"] == "info"
               for e in logs), "the recovery is logged"


async def test_unexpected_page_halts_naming_the_path_and_leaves_the_cursor(tmp_path: Path,
                                                                         autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(250), faults=["", "malformed"])
    state = tmp_path / "state"
    async with open_journal(state) as journal, polling(journal, api, halted_retry="2m") as source:
        await source.wait_state("halted")
        assert source.reason == ("the response from http://api.test/v1/audit_logs has no `audit_logs` "
                                 "(see items_field)")
        assert position(state).next == _cursor(100), "the cursor still points at the page that failed"
        assert len(stored(state)) == 100
        await source.wait_state("waiting")
    assert [r.get("after") for r in api.requests[:4]] == [None, _cursor(100), _cursor(100), _cursor(200)]
    assert float(api.requests[2]["_at"]) - float(api.requests[1]["_at"]) >= 120, "halted: retried slowly"
    assert len(stored(state)) == 250


async def test_refused_credentials_halt_with_one_error_until_fixed(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(50), token="rotated-key")
    state = tmp_path / "state"
    with capture_logs() as logs:
        async with open_journal(state) as journal, polling(journal, api, halted_retry="1m") as source:
            await source.wait_state("halted")
            await api.wait_requests(4)  # three slow retries
            assert cursor(state, "api") is None and stored(state) == []
            api.token = "test-api-key"
            await source.wait_state("waiting")
    errors = [e for e in logs if e["event"] == "poll_state" and e["log_level"] == "error"]
    assert len(errors) == 1, "one error per change of state, not one per retry"
    assert "refused the credentials (401): Missing or invalid authorization" in errors[0]["reason"]
    assert "test-api-key" not in repr(logs)
    assert len(stored(state)) == 50


async def test_a_stop_between_pages_neither_loses_nor_rereads_a_page(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(450))
    state = tmp_path / "state"
    held = trio.Event()

    async def hold_third_page(query: dict[str, str]) -> None:
        if query.get("after") == _cursor(200):
            held.set()
            await trio.sleep_forever()

    api.before_page = hold_third_page
    async with open_journal(state) as journal:
        async with polling(journal, api):
            await held.wait()
        assert position(state).next == _cursor(200)
        assert len(stored(state)) == 200

        api.before_page = None
        intake = await intake_for(journal, "api")
        results: list[relay.SubmitResult] = []
        submit = intake.submit

        async def counting(items: Any, *, cursor: Any) -> relay.SubmitResult:
            results.append(await submit(items, cursor=cursor))
            return results[-1]

        intake.submit = counting  # type: ignore[method-assign]
        async with polling(journal, api, intake=intake) as source:
            await source.wait_state("waiting")
    assert [r.get("after") for r in api.served()] == [None, _cursor(100), _cursor(200), _cursor(300), _cursor(400)]
    assert sum(r.duplicates for r in results) == 0, "nothing was read twice"
    assert len(stored(state)) == len(set(stored(state))) == 450


async def test_link_header_pagination(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(230), link=True)
    async with open_journal(tmp_path / "state") as journal, polling(journal, api, pagination="link") as source:
        await source.wait_state("waiting")
    assert [r.get("after") for r in api.requests] == [None, _cursor(100), _cursor(200)]
    assert len(stored(tmp_path / "state")) == 230


async def test_overlap_rereads_late_entries_and_dedupe_absorbs_them(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(100))
    state = tmp_path / "state"
    async with open_journal(state) as journal, polling(journal, api, overlap="1m") as source:
        await source.wait_state("waiting")
        late = entry("api_key.created", occurred_at="2024-05-14T00:01:00.500000Z", id_hint="late")
        api.entries.insert(61, late)  # published after the first poll, 39 s older than the newest seen
        await api.wait_requests(2)
        await source.wait_state("waiting")
    assert api.requests[1]["occurred_at[gte]"] == "2024-05-14T00:00:39.000000Z", "newest seen minus a minute"
    journaled = [orjson.loads(d)["id_hint"] for d in stored(state)]
    assert journaled.count("late") == 1 and len(journaled) == len(set(journaled)) == 101


async def test_start_at_now_asks_only_for_new_entries(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(10))
    async with open_journal(tmp_path / "state") as journal, polling(journal, api, start_at="now") as source:
        await source.wait_state("waiting")
    assert api.requests[0]["occurred_at[gte]"] > "2025-", "the window starts at the current time"
    assert stored(tmp_path / "state") == []


async def test_no_polling_while_the_journal_is_full(tmp_path: Path, autojump_clock: Any) -> None:
    api = PagedApi(entries=entries(120))
    async with open_journal(tmp_path / "state") as journal:
        gated = FullableIntake(await intake_for(journal, "api"), full=True)
        async with polling(journal, api, intake=gated) as source:
            await trio.sleep(600)
            assert api.requests == [] and source.state == "paused"
            gated.full = False
            await source.wait_state("waiting")
    assert len(stored(tmp_path / "state")) == 120


async def test_polls_a_real_http_server(tmp_path: Path) -> None:
    api = PagedApi(entries=entries(120))
    source_settings = settings(url=f"http://127.0.0.1:{free_port()}/v1/audit_logs", interval="50ms")
    config = asgi.hypercorn_config(source_settings.url.split("/")[2])
    async with open_journal(tmp_path / "state") as journal, trio.open_nursery() as nursery:
        await nursery.start(asgi.serve, api, config)
        source = PollSource(context_for(journal, "api"), source_settings)
        await source.open()
        await nursery.start(source.run, await intake_for(journal, "api"))
        await api.wait_requests(3)  # two pages, then the next poll
        nursery.cancel_scope.cancel()
    await source.close()
    assert len(stored(tmp_path / "state")) == 120


def _response(body: Any, status: int = 200, **headers: str) -> httpx.Response:
    request = httpx.Request("GET", URL)
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.Response(status, content=content, headers=headers, request=request)


@pytest.mark.parametrize(("body", "overrides", "expected"), [
    ({"audit_logs": {"a": 1}}, {}, "`audit_logs` in the response is not an array"),
    ({"result": {"items": []}}, {"items_field": "result.entries"}, "has no `result.entries`"),
    ({"audit_logs": [], "pagination_meta": {"after": {"x": 1}}}, {}, "`pagination_meta.after` in the response is"
                                                                      " not a string"),
    ({"audit_logs": [], "pagination_meta": {"after": "same"}}, {}, "same next-page cursor again"),
    (b"<html>", {}, "is not JSON"),
])
def test_unexpected_shapes_halt_with_the_path(body: Any, overrides: dict[str, Any], expected: str,
                                              tmp_path: Path) -> None:
    source = PollSource(relay.Context("api", "source", tmp_path), settings(**overrides))
    outcome = source._page(_response(body), Position(next="same"))
    assert isinstance(outcome, Halt) and expected in outcome.reason, outcome


def test_nested_items_and_cursor_paths(tmp_path: Path) -> None:
    source = PollSource(relay.Context("api", "source", tmp_path),
                        settings(items_field="data.entries", next_cursor_field="meta.next"))
    outcome = source._page(_response({"data": {"entries": [1]}, "meta": {"next": 7}}), Position())
    assert outcome == Page([1], "7")
    assert source._page(_response({"data": {"entries": []}, "meta": {"next": None}}), Position()) == Page([], None)


async def test_redirects_are_not_followed(tmp_path: Path) -> None:
    seen: list[str] = []

    def redirect(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"location": "https://elsewhere.test/audit_logs"})

    source = PollSource(relay.Context("api", "source", tmp_path), settings(headers={"X-Api-Key": "k" * 20}))
    source.transport = httpx.MockTransport(redirect)
    await source.open()
    outcome = await source.fetch(Position())
    await source.close()
    assert isinstance(outcome, Halt) and "a redirect to https://elsewhere.test/audit_logs" in outcome.reason
    assert seen == [f"{URL}?page_size=100"], "the credentials went nowhere else"


def test_link_to_another_server_is_not_followed(tmp_path: Path) -> None:
    source = PollSource(relay.Context("api", "source", tmp_path), settings(pagination="link"))
    outcome = source._page(_response({"audit_logs": []}, link='<https://evil.test/x?after=1>; rel="next"'),
                           Position())
    assert isinstance(outcome, Halt) and "another server (evil.test)" in outcome.reason


@pytest.mark.parametrize(("overrides", "message"), [
    ({"start_at": "yesterday"}, "must be oldest, now or an RFC 3339 timestamp"),
    ({"start_at": "now", "since_param": None}, "start_at needs since_param"),
    ({"url": "ftp://x/y"}, "must be an http:// or https:// URL"),
])
def test_settings_are_checked(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        settings(**overrides)


async def test_check_reports_refused_credentials(tmp_path: Path) -> None:
    source = PollSource(relay.Context("api", "source", tmp_path), settings())
    source.transport = httpx.ASGITransport(app=PagedApi(token="other"))
    await source.open()
    with pytest.raises(relay.CheckFailed, match=r"refused the credentials \(401\)"):
        await source.check()
    await source.close()
    assert isinstance(Retry("x"), Retry)


async def test_a_timestamp_set_as_cursor_starts_the_window_there(tmp_path: Path, autojump_clock: Any) -> None:
    """What `relay cursor set --value 2024-05-14T00:02:00Z` leaves in the journal."""
    api = PagedApi(entries=entries(200))
    async with open_journal(tmp_path / "state") as journal:
        await (await intake_for(journal, "api")).submit([], cursor="2024-05-14T00:02:00Z")
        async with polling(journal, api) as source:
            await source.wait_state("waiting")
    assert api.requests[0]["occurred_at[gte]"] == "2024-05-14T00:02:00.000000Z"
    assert len(stored(tmp_path / "state")) == 80


class ApiThread:
    """The fake API over real HTTP in a thread of its own (the relay under test is another process)."""

    def __init__(self, api: PagedApi) -> None:
        self.api = api
        self.port = free_port()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    async def _main(self) -> None:
        self._stop, self._token = trio.Event(), trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(asgi.serve, self.api, asgi.hypercorn_config(f"127.0.0.1:{self.port}"))
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def __enter__(self) -> ApiThread:
        self._thread.start()
        assert self._ready.wait(30), "the fake API did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None and self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)


def test_kill_9_between_pages_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    total = 1500
    api = PagedApi(entries=entries(total))
    committed: list[str | None] = []

    async def slow_page(query: dict[str, str]) -> None:
        await trio.sleep(0.05)  # pages take a while, so kills land between and inside them

    api.before_page = slow_page
    state = tmp_path / "state"
    with ApiThread(api) as server:
        config = write_config(tmp_path / "relay.yaml", config_dict(tmp_path, sources={"api": {
            "type": "poll", "url": f"http://127.0.0.1:{server.port}/v1/audit_logs", "page_size": 50,
            "auth": {"bearer_token": "test-api-key"}, "interval": "1h"}}, destinations={}))
        relay_process = RelayProcess(config, tmp_path / "relay.log")
        try:
            for pages in (3, 14):
                relay_process.start()
                wait_until_sync(lambda n=pages: len(api.served()) >= n, 60, f"{pages} pages served")
                relay_process.kill()
                committed.append(Position.decode(cursor(state, "api") or "{}").next)
            relay_process.start()
            wait_until_sync(lambda: Position.decode(cursor(state, "api") or "{}").watermark is not None
                            and Position.decode(cursor(state, "api") or "{}").next is None, 120, "the last page")
            relay_process.terminate()
        finally:
            relay_process.stop_quietly()
    journaled = stored(state)
    assert len(journaled) == len(set(journaled)) == total, "no loss, no duplicates"
    starts = [i for i, r in enumerate(api.requests) if i == 0 or r.get("after") is None]
    assert len(starts) == 1, "no restart read the list from its beginning again"
    for cut in committed:
        assert cut is not None, "each kill landed mid-traversal"
        assert sum(1 for r in api.served() if r.get("after") == cut) <= 2, "at most the page in flight is re-read"
