"""Source `poll`: fetch audit entries from an HTTP API that pages with a cursor or with `Link: rel="next"`.

The defaults follow incident.io's API conventions (`page_size`, `after`, `pagination_meta.after`, bearer
API key, 429 with `rate_limit.retry_after`). Each page's entries and the position after it are committed
in one journal transaction, so a crash between pages neither loses nor re-reads a page.

A poll is one traversal of the pages of the window `since_param >= since`. The first window starts at
`start_at`; each later one at the newest `occurred_at` seen minus `overlap` (entries published late are
re-read, and the journal's dedupe drops the ones it already holds). The cursor is JSON:
`{"next": <cursor or URL of the next page, null between polls>, "since": <this poll's window start>,
"watermark": <newest occurred_at seen>}`.

Metrics (label `source`):
    audit_relay_poll_state{state}                   1 for the current state: polling, waiting, paused,
                                                    backoff, halted
    audit_relay_poll_requests_total{code}           API requests, by HTTP status (`error`: no answer)
    audit_relay_poll_last_success_timestamp_seconds when a page was last committed
Log events: `poll_state` on every change of state or reason, one line per change, not per attempt: error
for halted, warning for backoff and paused, info when polling resumes after one of those, debug for the
routine polling/waiting; `poll_cursor_reset` when a stored cursor cannot be read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import orjson
import trio
from pydantic import Field, field_validator, model_validator

import relay
from relay.entry import loads, parse_occurred_at
from relay.http_client import AsyncClient
from relay.retry import Backoff, parse_retry_after

STATES = ("polling", "waiting", "paused", "backoff", "halted")


class PollAuth(relay.Settings):
    bearer_token: relay.Secret
    """Sent as `Authorization: Bearer <token>`."""


class PollSettings(relay.Settings):
    url: str
    """The list endpoint, e.g. `https://api.example.com/v1/audit_logs`."""
    headers: dict[str, relay.Secret] = {}
    """Extra request headers (values are treated as secrets: never logged)."""
    auth: PollAuth | None = None
    interval: relay.Duration = Field(default=60.0, gt=0)
    """Time from the start of one poll to the start of the next."""
    page_size: int = Field(default=250, gt=0)
    page_size_param: str | None = "page_size"
    items_field: str = "audit_logs"
    """Dotted path of the entries array in a response."""
    pagination: Literal["cursor", "link"] = "cursor"
    """`cursor`: `cursor_param` from `next_cursor_field`; `link`: follow the RFC 8288 `Link: rel="next"`."""
    cursor_param: str = "after"
    next_cursor_field: str = "pagination_meta.after"
    """Dotted path of the next page's cursor; absent, null or empty means this was the last page."""
    start_at: str = "oldest"
    """Window start of the first poll: `oldest`, `now`, or an RFC 3339 timestamp."""
    since_param: str | None = "occurred_at[gte]"
    """Query parameter carrying the window start (RFC 3339); null when the API has none (every poll then
    reads the whole list and dedupe drops what is already journaled)."""
    overlap: relay.Duration = 0.0
    """Each window starts this much before the newest entry seen, for APIs that publish entries late."""
    timeout: relay.Duration = Field(default=30.0, gt=0)
    """Longest wait for one response."""
    initial_backoff: relay.Duration = Field(default=1.0, gt=0)
    max_backoff: relay.Duration = Field(default=300.0, gt=0)
    """Retries after 429, 5xx and network errors back off exponentially (full jitter) up to this."""
    halted_retry: relay.Duration = Field(default=300.0, gt=0)
    """How often a halted source (401/403, other 4xx, unexpected response) tries again."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        url = httpx.URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("start_at")
    @classmethod
    def _start_at(cls, value: str) -> str:
        if value not in ("oldest", "now"):
            try:
                parse_occurred_at(value)
            except ValueError as exc:
                raise ValueError(f"must be oldest, now or an RFC 3339 timestamp: {exc}") from None
        return value

    @model_validator(mode="after")
    def _window(self) -> PollSettings:
        if self.since_param is None and self.start_at != "oldest":
            raise ValueError("start_at needs since_param (the API's window parameter)")
        return self


@dataclass(frozen=True)
class Position:
    """Where polling stands; committed as the cursor with each page."""

    next: str | None = None
    since: str | None = None
    watermark: str | None = None

    def encode(self) -> str:
        return orjson.dumps({"next": self.next, "since": self.since, "watermark": self.watermark}).decode()

    @classmethod
    def decode(cls, text: str) -> Position:
        value = orjson.loads(text)
        if not isinstance(value, dict) or not all(v is None or isinstance(v, str) for v in value.values()):
            raise ValueError("not a poll cursor")
        return cls(value.get("next"), value.get("since"), value.get("watermark"))


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next: str | None


@dataclass(frozen=True)
class Retry:
    reason: str
    after: float | None = None
    """The server's requested delay, if it gave one."""


@dataclass(frozen=True)
class Halt:
    reason: str


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lookup(value: Any, path: str) -> tuple[bool, Any]:
    """`(found, value)` at a dotted path in parsed JSON."""
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _api_message(response: httpx.Response) -> str:
    """The first error message of an incident.io-style error envelope, if the body is one."""
    try:
        body = orjson.loads(response.content)
        message = body["errors"][0]["message"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return ""
    return f": {str(message)[:200]}" if message else ""


class PollSource(relay.Source):
    type_name = "poll"
    Settings = PollSettings
    settings: PollSettings

    transport: httpx.AsyncBaseTransport | None = None
    """httpx's own network transport unless set (tests put an in-process fake API here)."""

    def __init__(self, context: relay.Context, settings: PollSettings) -> None:
        super().__init__(context, settings)
        self.state = ""
        self.reason: str | None = None
        self._m_state = context.gauge("poll_state", "1 for the poll source's current state.", ("state",))
        self._m_requests = context.counter("poll_requests_total", "API requests, by HTTP status.", ("code",))
        self._m_success = context.gauge("poll_last_success_timestamp_seconds", "When a page was last committed.")
        self._client: httpx.AsyncClient | None = None
        self._changed = trio.Event()
        self._endpoint = str(httpx.URL(settings.url).copy_with(query=None))
        """The URL without its query (which might carry a key), for logs."""

    async def open(self) -> None:
        headers = {"accept": "application/json", "user-agent": f"audit-relay/{relay.__version__}"}
        headers.update({name: value.reveal() for name, value in self.settings.headers.items()})
        if self.settings.auth is not None:
            headers["authorization"] = f"Bearer {self.settings.auth.bearer_token.reveal()}"
        # No redirects: a redirect to another host would carry the credentials (custom headers) along.
        self._client = AsyncClient(headers=headers, timeout=self.settings.timeout, follow_redirects=False,
                                   transport=self.transport)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # -- one request ----------------------------------------------------------------------------------

    def _request(self, position: Position) -> httpx.URL:
        if position.next is not None and self.settings.pagination == "link":
            return httpx.URL(position.next)
        params: dict[str, str] = {}
        if self.settings.page_size_param:
            params[self.settings.page_size_param] = str(self.settings.page_size)
        if self.settings.since_param and position.since is not None:
            params[self.settings.since_param] = position.since
        if position.next is not None:
            params[self.settings.cursor_param] = position.next
        # Merged by hand: httpx's `params=` would replace a query the configured URL already has.
        return httpx.URL(self.settings.url).copy_merge_params(params)

    async def fetch(self, position: Position) -> Page | Retry | Halt:
        """One API request for the page at `position`, classified."""
        assert self._client is not None, "open() must run first"
        try:
            response = await self._client.get(self._request(position))
        except httpx.TransportError as exc:
            self._m_requests.labels("error").inc()
            return Retry(f"no answer from {self._endpoint}: {type(exc).__name__}: {exc}")
        self._m_requests.labels(str(response.status_code)).inc()
        status = response.status_code
        if status == 429:
            return Retry(f"rate limited (429){_api_message(response)}", self._retry_after(response))
        if status >= 500 or status == 408:
            return Retry(f"{self._endpoint} answered {status}{_api_message(response)}",
                         parse_retry_after(response.headers.get("retry-after")))
        if 300 <= status < 400:
            location = response.headers.get("location", "nowhere")
            return Halt(f"{self._endpoint} answered {status}, a redirect to {location[:200]}; set `url` to the "
                        "address the API really answers at (redirects are not followed, to keep the credentials)")
        if status in (401, 403):
            return Halt(f"{self._endpoint} refused the credentials ({status}){_api_message(response)}; "
                        "check auth.bearer_token / headers")
        if not 200 <= status < 300:
            return Halt(f"{self._endpoint} answered {status}{_api_message(response)}")
        return self._page(response, position)

    def _retry_after(self, response: httpx.Response) -> float | None:
        delay = parse_retry_after(response.headers.get("retry-after"))
        if delay is None:
            try:
                found, value = lookup(orjson.loads(response.content), "rate_limit.retry_after")
            except orjson.JSONDecodeError:
                return None
            delay = parse_retry_after(value) if found and isinstance(value, str) else None
        return delay

    def _page(self, response: httpx.Response, position: Position) -> Page | Halt:
        try:
            body = loads(response.content)
        except orjson.JSONDecodeError as exc:
            kind = response.headers.get("content-type", "no content type")
            return Halt(f"the response from {self._endpoint} is not JSON ({kind}): {exc.msg}")
        found, items = lookup(body, self.settings.items_field)
        if not found:
            return Halt(f"the response from {self._endpoint} has no `{self.settings.items_field}` "
                        "(see items_field)")
        if not isinstance(items, list):
            return Halt(f"`{self.settings.items_field}` in the response is not an array")
        if self.settings.pagination == "link":
            link = response.links.get("next", {}).get("url")
            if not link:
                return Page(items, None)
            target = response.url.join(link)
            if (target.scheme, target.host, target.port) != (response.url.scheme, response.url.host,
                                                             response.url.port):
                return Halt(f"the next-page link points to another server ({target.host}); not following it "
                            "with the credentials")
            next_cursor: str | None = str(target)
        else:
            found, value = lookup(body, self.settings.next_cursor_field)
            if value is None or value == "":
                return Page(items, None)
            if not isinstance(value, str | int) or isinstance(value, bool):
                return Halt(f"`{self.settings.next_cursor_field}` in the response is not a string")
            next_cursor = str(value)
        if next_cursor == position.next:
            return Halt(f"the API returned the same next-page cursor again ({self.settings.next_cursor_field}); "
                        "following it would loop")
        return Page(items, next_cursor)

    # -- the polling loop -----------------------------------------------------------------------------

    def _start(self, stored: str | None) -> Position:
        if stored:
            try:
                return Position.decode(stored)
            except (ValueError, orjson.JSONDecodeError):
                pass
            try:  # `relay cursor set --value <RFC 3339>`: the next poll's window starts there
                parse_occurred_at(stored.strip())
                return Position(None, stored.strip(), stored.strip())
            except ValueError:
                self.log.warning("poll_cursor_reset", hint="the stored cursor is neither a poll cursor nor an "
                                 "RFC 3339 timestamp; starting from start_at (journaled entries are deduplicated)")
        return Position()

    def _window(self, position: Position) -> Position:
        """The position that starts a new poll: the window begins at the watermark minus `overlap`."""
        if position.watermark is not None:
            since = rfc3339(parse_occurred_at(position.watermark) - self.settings.overlap)
            return Position(None, since if self.settings.since_param else None, position.watermark)
        start = self.settings.start_at
        if start == "oldest":
            return Position()
        since = rfc3339(time.time()) if start == "now" else start
        return Position(None, since, since)

    @staticmethod
    def _advance(position: Position, page: Page) -> Position:
        newest = parse_occurred_at(position.watermark) if position.watermark else -math.inf
        for item in page.items:
            if isinstance(item, dict):
                try:
                    newest = max(newest, parse_occurred_at(item.get("occurred_at")))
                except ValueError:
                    continue  # an invalid entry: quarantined by submit(), not a watermark
        watermark = rfc3339(newest) if newest > -math.inf else None
        return replace(position, next=page.next, watermark=watermark)

    async def wait_state(self, state: str) -> None:
        """Return once the source is in `state` (for tests and embedding)."""
        while self.state != state:
            await self._changed.wait()

    def _set_state(self, state: str, reason: str | None = None) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        self._changed.set()
        self._changed = trio.Event()
        recovered = self.state in ("backoff", "halted", "paused")
        self.state, self.reason = state, reason
        for candidate in STATES:
            self._m_state.labels(candidate).set(1 if candidate == state else 0)
        level = {"halted": "error", "backoff": "warning", "paused": "warning"}.get(
            state, "info" if recovered else "debug")
        getattr(self.log, level)("poll_state", state=state, url=self._endpoint,
                                 **({"reason": reason} if reason else {}))

    async def run(self, intake: relay.Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        position = self._start(intake.cursor)
        backoff = Backoff(self.settings.initial_backoff, self.settings.max_backoff)
        task_status.started()
        poll_started = trio.current_time()
        if position.next is None:
            position = self._window(position)
        self._set_state("polling")
        while True:
            if not intake.writable:
                self._set_state("paused", "the journal is full; polling resumes when it has room")
                await intake.wait_writable()
                self._set_state("polling")
            outcome = await self.fetch(position)
            if isinstance(outcome, Retry):
                delay = backoff.next_delay(outcome.after)
                self._set_state("backoff", outcome.reason)
                await trio.sleep(delay)
                continue
            if isinstance(outcome, Halt):
                self._set_state("halted", outcome.reason)
                await trio.sleep(self.settings.halted_retry)
                continue
            backoff.reset()
            self._set_state("polling")  # logged only when it changes, e.g. after a halt or backoff
            following = self._advance(position, outcome)
            await self._commit(intake, outcome.items, following)
            position = following
            if position.next is None:
                self._set_state("waiting")
                await trio.sleep_until(poll_started + self.settings.interval)
                poll_started = trio.current_time()
                position = self._window(position)
                self._set_state("polling")

    async def _commit(self, intake: relay.Intake, items: list[Any], position: Position) -> None:
        """Journal a page with the position after it; while the journal is full, wait and try again."""
        while True:
            try:
                await intake.submit(items, cursor=position.encode())
            except relay.JournalUnavailable as exc:
                self._set_state("paused", exc.reason)
                await intake.wait_writable()
                if not intake.writable:
                    await trio.sleep(exc.retry_after)
                continue
            self._m_success.set(time.time())
            return

    async def check(self) -> str:
        outcome = await self.fetch(self._window(Position()))
        if isinstance(outcome, Retry | Halt):
            raise relay.CheckFailed(outcome.reason)
        return f"{self._endpoint} answered with {len(outcome.items)} entries on the first page"


@relay.hookimpl
def register_source_types(register):  # type: ignore[no-untyped-def]
    register(PollSource)
