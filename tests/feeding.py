"""A source for reload and load tests: entry `i` of a feed has id `feed-<i>`, and the cursor is `i`.

Because every entry is determined by its position, a test can check that each one reached a destination
exactly once even though the source was stopped and started again (from its committed cursor) many times.
Registered per test through `make_config(..., extra=[feeding])`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

import relay
from tests.helpers import entry


@dataclass
class Feed:
    limit: int
    """Entries to produce in total."""
    pace: float = 0.001
    """Seconds between submits: a steady stream rather than one burst."""
    produced: int = 0
    instances: int = 0
    """How many times a source instance started running on this feed."""
    _changed: trio.Event = field(default_factory=trio.Event)

    async def wait(self, predicate: Callable[[Feed], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


FEEDS: dict[str, Feed] = {}


def feed_entry(name: str, i: int) -> dict[str, Any]:
    return entry("user.created" if i % 2 else "api_key.created", id=f"{name}-{i:06d}",
                 occurred_at=f"2024-05-14T09:{i // 60 % 60:02d}:{i % 60:02d}.000000Z")


def entry_ids(entries: list[relay.Entry]) -> list[str]:
    return [e.value()["id"] for e in entries]


class FeedSettings(relay.Settings):
    feed: str
    per_submit: int = 5
    variant: int = 0
    """Changing it changes the settings, so a reload restarts the source."""
    fail_open: str | None = None
    """Make `open()` fail with this message (a receiver whose address is taken)."""


class FeedSource(relay.Source):
    type_name = "feed"
    Settings = FeedSettings
    settings: FeedSettings

    async def open(self) -> None:
        if self.settings.fail_open:
            raise OSError(self.settings.fail_open)

    async def run(self, intake: relay.Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        feed = FEEDS[self.settings.feed]
        feed.instances += 1
        position = int(intake.cursor or 0)
        task_status.started()
        while position < feed.limit:
            end = min(feed.limit, position + self.settings.per_submit)
            items = [feed_entry(self.settings.feed, i) for i in range(position, end)]
            try:
                await intake.submit(items, cursor=str(end))
            except relay.JournalUnavailable:
                await trio.sleep(0.01)
                continue
            position = end
            feed.produced = max(feed.produced, position)
            feed.notify()
            await trio.sleep(feed.pace)
        await trio.sleep_forever()


class FragileSettings(relay.Settings):
    script: str
    broken: bool = False
    """Make the constructor fail (a plugin that rejects its settings at run time)."""


class FragileDestination(relay.Destination):
    """The scripted destination, except that it can refuse to be built."""

    type_name = "fragile"
    Settings = FragileSettings

    def __init__(self, context: relay.Context, settings: FragileSettings) -> None:
        if settings.broken:
            raise RuntimeError("cannot build this destination")
        super().__init__(context, settings)
        from tests.scripted import ScriptedDestination

        self._scripted = ScriptedDestination(context, settings)

    async def send(self, batch: relay.Batch) -> relay.Result:
        return await self._scripted.send(batch)


@relay.hookimpl
def register_source_types(register):  # type: ignore[no-untyped-def]
    register(FeedSource)


@relay.hookimpl
def register_destination_types(register):  # type: ignore[no-untyped-def]
    register(FragileDestination)
