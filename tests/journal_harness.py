"""A journal and a source's intake without the rest of the relay, for testing sources on their own."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import trio

import relay
from relay.context import Context
from relay.intake import JournalIntake
from relay.journal import Journal, JournalStateStore
from relay.journal_schema import JOURNAL_FILE


@asynccontextmanager
async def open_journal(state_dir: Path, max_size: int = 1 << 30, retention: float = 86400.0
                       ) -> AsyncIterator[Journal]:
    """A running journal (writer task included) until the block ends."""
    journal = Journal(state_dir, max_size=max_size, retention=retention)
    await journal.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            yield journal
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await journal.close()


async def intake_for(journal: Journal, name: str) -> JournalIntake:
    """The intake the service would give source `name`: its committed cursor included."""
    return JournalIntake(name, journal, await journal.load_cursor(name))


def context_for(journal: Journal, name: str) -> Context:
    return Context(name, "source", journal.state_dir, JournalStateStore(journal, f"source:{name}"))


def _db(state_dir: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(f"file:{state_dir / JOURNAL_FILE}?mode=ro", uri=True))


def stored(state_dir: Path, source: str | None = None) -> list[bytes]:
    """The data of every journaled entry (of `source`), in journal order."""
    where, args = ("WHERE source = ?", (source,)) if source else ("", ())
    with _db(state_dir) as db:
        return [row[0] for row in db.execute(f"SELECT data FROM entries {where} ORDER BY seq", args)]


def quarantined(state_dir: Path) -> list[tuple[str, bytes]]:
    """(reason, data) of everything in quarantine, oldest first."""
    with _db(state_dir) as db:
        return list(db.execute("SELECT reason, data FROM quarantine ORDER BY id"))


def cursor(state_dir: Path, source: str) -> str | None:
    with _db(state_dir) as db:
        row = db.execute("SELECT cursor FROM sources WHERE name = ?", (source,)).fetchone()
    return row[0] if row else None


class FullableIntake:
    """A source's intake whose journal can be made full: meanwhile `writable` is False, `submit` raises
    `JournalUnavailable` (as the real journal does) and `wait_writable` waits until `full` is cleared."""

    def __init__(self, inner: relay.Intake, *, full: bool = False) -> None:
        self.inner = inner
        self._room = trio.Event()
        self.full = full

    @property
    def full(self) -> bool:
        return not self._room.is_set()

    @full.setter
    def full(self, value: bool) -> None:
        if not value:
            self._room.set()
        elif self._room.is_set():
            self._room = trio.Event()

    @property
    def cursor(self) -> str | None:
        return self.inner.cursor

    @property
    def writable(self) -> bool:
        return not self.full

    async def submit(self, items: Any, *, cursor: Any = relay.UNCHANGED, **where: Any) -> relay.SubmitResult:
        if self.full:
            raise relay.JournalUnavailable("the journal is full", retry_after=10)
        return await self.inner.submit(items, cursor=cursor, **where)

    async def submit_prepared(self, batch: relay.Prepared, *, cursor: Any = relay.UNCHANGED) -> relay.SubmitResult:
        if self.full:
            raise relay.JournalUnavailable("the journal is full", retry_after=10)
        return await self.inner.submit_prepared(batch, cursor=cursor)

    async def quarantine(self, raw: bytes, reason: str) -> None:
        await self.inner.quarantine(raw, reason)

    async def wait_writable(self) -> None:
        await self._room.wait()
