"""The journal-backed `Intake` each source gets: validate, quarantine, journal, count."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import trio

from relay import metrics
from relay.entry import Prepared, prepare_batch
from relay.errors import JournalUnavailable
from relay.journal import Journal
from relay.source import UNCHANGED, SubmitResult


class JournalIntake:
    def __init__(self, source: str, journal: Journal, cursor: str | None,
                 last_success_at: float | None = None) -> None:
        self.source = source
        self._journal = journal
        self._cursor = cursor
        self.last_success_at = last_success_at
        """When a submit last committed (also an empty one: a poll that found nothing new is a success)."""
        self._closed = False
        self._m_duplicates = metrics.source_duplicates.labels(source)
        self._m_quarantined = metrics.source_quarantined.labels(source)

    @property
    def cursor(self) -> str | None:
        return self._cursor

    @property
    def writable(self) -> bool:
        return not self._closed and self._journal.writable

    def close(self) -> None:
        """Refuse further submits (the relay is stopping or the source is being replaced)."""
        self._closed = True

    async def submit(self, items: Sequence[Any], *, cursor: str | None = UNCHANGED,
                     labels: Sequence[str] | None = None, raws: Sequence[bytes] | None = None) -> SubmitResult:
        await self._admit()
        return await self._journal_batch(prepare_batch(items, labels, raws), cursor)

    async def submit_prepared(self, batch: Prepared, *, cursor: str | None = UNCHANGED) -> SubmitResult:
        await self._admit()
        return await self._journal_batch(batch, cursor)

    async def _admit(self) -> None:
        """A checkpoint (a submit is always one), then refuse if the intake is closed."""
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise JournalUnavailable("the relay is stopping", retry_after=5.0)

    async def _journal_batch(self, batch: Prepared, cursor: str | None) -> SubmitResult:
        try:
            inserted = await self._journal.append(self.source, batch.accepted, batch.quarantined, cursor,
                                                  keep_cursor=cursor is UNCHANGED)
        except JournalUnavailable as exc:
            reason = "full" if "full" in exc.reason else "unavailable"
            metrics.source_rejected_requests.labels(self.source, reason).inc()
            raise
        if cursor is not UNCHANGED:
            self._cursor = cursor
        self.last_success_at = time.time()
        for family, count in batch.families.items():
            metrics.source_received.labels(self.source, family).inc(count)
        for kind, count in batch.unrecognized.items():
            metrics.source_unrecognized.labels(self.source, kind).inc(count)
        duplicates = len(batch.accepted) - inserted
        self._m_duplicates.inc(duplicates)
        self._m_quarantined.inc(len(batch.quarantined))
        return SubmitResult(inserted, duplicates, len(batch.quarantined), tuple(batch.problems))

    async def quarantine(self, raw: bytes, reason: str) -> None:
        await self._journal.quarantine(self.source, reason, raw)
        self._m_quarantined.inc()

    async def wait_writable(self) -> None:
        if self._closed:
            await trio.sleep_forever()  # the relay is stopping: this source is about to be cancelled
        await self._journal.wait_writable()
