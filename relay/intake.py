"""The journal-backed `Intake` each source gets: validate, quarantine, journal, count."""

from __future__ import annotations

import reprlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson
import trio

from relay import metrics
from relay.entry import NewEntry, prepare
from relay.errors import EntryError, JournalUnavailable
from relay.journal import Journal
from relay.source import UNCHANGED, SubmitResult

_REPR = reprlib.Repr()
"""For quarantining what JSON cannot hold: bounded in depth and size, so a hostile value cannot exhaust
the stack (plain `repr` of a value nested 10,000 deep raises RecursionError) or memory."""
_REPR.maxlevel = 64
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxother = 10_000
_REPR.maxstring, _REPR.maxlong = 1_000_000, 1_000


def _raw(item: Any) -> bytes:
    """The bytes kept in quarantine for an item that failed validation: JSON when possible."""
    try:
        return orjson.dumps(item)
    except (TypeError, orjson.JSONEncodeError):
        pass
    try:  # keys that are not strings, bytes, sets, 100-digit numbers: as JSON, with such values as repr()
        return orjson.dumps(item, default=repr, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return _REPR.repr(item).encode("utf-8", "backslashreplace")


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
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise JournalUnavailable("the relay is stopping", retry_after=5.0)
        accepted: list[NewEntry] = []
        quarantined: list[tuple[str, bytes]] = []
        problems: list[tuple[int, str]] = []
        append = accepted.append
        for index, item in enumerate(items):
            try:
                append(prepare(item))
            except EntryError as exc:
                reason = f"{labels[index] if labels is not None else f'entry {index}'}: {exc}"
                problems.append((index, reason))
                quarantined.append((reason, raws[index] if raws is not None else _raw(item)))
        try:
            inserted = await self._journal.append(self.source, accepted, quarantined, cursor,
                                                  keep_cursor=cursor is UNCHANGED)
        except JournalUnavailable as exc:
            reason = "full" if "full" in exc.reason else "unavailable"
            metrics.source_rejected_requests.labels(self.source, reason).inc()
            raise
        if cursor is not UNCHANGED:
            self._cursor = cursor
        self.last_success_at = time.time()
        families = Counter(metrics.action_family(e.action) for e in accepted)
        for family, count in families.items():
            metrics.source_received.labels(self.source, family).inc(count)
        unrecognized = Counter(kind for e in accepted for kind in e.unrecognized)
        for kind, count in unrecognized.items():
            metrics.source_unrecognized.labels(self.source, kind).inc(count)
        self._m_duplicates.inc(len(accepted) - inserted)
        self._m_quarantined.inc(len(quarantined))
        return SubmitResult(inserted, len(accepted) - inserted, len(quarantined), tuple(problems))

    async def quarantine(self, raw: bytes, reason: str) -> None:
        await self._journal.quarantine(self.source, reason, raw)
        self._m_quarantined.inc()

    async def wait_writable(self) -> None:
        if self._closed:
            await trio.sleep_forever()  # the relay is stopping: this source is about to be cancelled
        await self._journal.wait_writable()
