"""`relay replay`: deliver the journal's entries from a time range again, to one destination only.

For onboarding a new SIEM, or after the receiving side lost data. The entries (by `occurred_at`, still in
the journal: see `journal.retention`) are appended again as copies routed to that destination alone, so
no other destination sees them twice. The copies go through the destination's usual delivery loop (its
filter, batching, retries, dead letters) after whatever it has queued already.

It works beside a running relay (which picks the copies up within seconds) or a stopped one. The copies
are written in chunks of short transactions, so the relay's own writes are never held up for long; if
interrupted, what was copied stays copied and the message says where to resume.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from relay.admin import open_journal
from relay.entry import parse_occurred_at
from relay.errors import RelayError
from relay.settings import parse_duration

__all__ = ["ReplayInterrupted", "ReplayPlan", "parse_time", "plan_replay", "replay"]

CHUNK = 2000

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAIVE = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")


def parse_time(text: str, now: float | None = None) -> float:
    """`2024-05-14T09:30:00Z` (RFC 3339), `2024-05-14` or `2024-05-14T09:30` (UTC), or an age such as
    `90m`, `6h`, `2d` (that long before now) -> Unix seconds."""
    now = time.time() if now is None else now
    text = text.strip()
    if _DATE.match(text):
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()
    if _NAIVE.match(text):
        return datetime.fromisoformat(text.replace(" ", "T")).replace(tzinfo=UTC).timestamp()
    try:
        return parse_occurred_at(text)
    except ValueError:
        pass
    try:
        return now - parse_duration(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use 2024-05-14T09:30:00Z, 2024-05-14, or an age such "
                         "as 6h or 2d") from None


@dataclass(frozen=True)
class ReplayPlan:
    destination: str
    since: float
    until: float
    entries: int
    bytes: int
    first_seq: int
    last_seq: int
    oldest_held: float | None
    """`occurred_at` of the oldest entry the journal still holds (older ones were pruned)."""


_MATCH = "route IS NULL AND occurred_at >= ? AND occurred_at < ?"


def plan_replay(state_dir: Path, destination: str, since: float, until: float, from_seq: int = 0) -> ReplayPlan:
    """What a replay would copy. Only original entries count (not earlier replays or dead-letter
    replays), and only those already in the journal now: entries arriving meanwhile are delivered anyway.
    `from_seq` resumes an interrupted replay."""
    if until <= since:
        raise RelayError("--until must be later than --since")
    with open_journal(state_dir) as db:
        known = db.execute("SELECT removed_at FROM destinations WHERE name = ?", (destination,)).fetchone()
        if known is None:
            raise RelayError(f"the journal has no destination {destination!r}: start the relay with it configured "
                             "first, so it has an offset")
        if known[0] is not None:
            raise RelayError(f"destination {destination!r} was removed from the configuration")
        count, size, first, last = db.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0), min(seq), max(seq) FROM entries"
            f" WHERE seq >= ? AND {_MATCH}", (from_seq, since, until)).fetchone()
        oldest = db.execute("SELECT min(occurred_at) FROM entries WHERE route IS NULL").fetchone()[0]
    return ReplayPlan(destination, since, until, count, size, first or 0, last or 0, oldest)


def replay(state_dir: Path, plan: ReplayPlan, *, max_size: int | None = None,
           progress: Callable[[int], None] = lambda done: None) -> int:
    """Append routed copies of the planned entries, a chunk per transaction; returns how many. If
    interrupted, raises `ReplayInterrupted` saying how far it got."""
    done = 0
    with open_journal(state_dir, readonly=False) as db:
        if max_size is not None:
            _check_room(db, plan, max_size)
        after = plan.first_seq - 1
        try:
            while after < plan.last_seq:
                db.execute("BEGIN IMMEDIATE")
                try:
                    seqs = [r[0] for r in db.execute(
                        f"SELECT seq FROM entries WHERE seq > ? AND seq <= ? AND {_MATCH} ORDER BY seq LIMIT ?",
                        (after, plan.last_seq, plan.since, plan.until, CHUNK))]
                    if not seqs:
                        db.execute("COMMIT")
                        break
                    copied = db.execute(
                        "INSERT INTO entries (key, source, route, received_at, occurred_at, action, actor_type,"
                        " target_types, data) SELECT NULL, source, ?, ?, occurred_at, action, actor_type,"
                        f" target_types, data FROM entries WHERE seq BETWEEN ? AND ? AND {_MATCH} ORDER BY seq",
                        (plan.destination, time.time(), seqs[0], seqs[-1], plan.since, plan.until)).rowcount
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                after = seqs[-1]
                done += copied
                progress(done)
        except KeyboardInterrupt:
            raise ReplayInterrupted(done, after) from None
    return done


class ReplayInterrupted(RelayError):
    def __init__(self, done: int, last_seq: int) -> None:
        self.done = done
        self.last_seq = last_seq
        super().__init__(f"interrupted after copying {done:,} entries (up to journal #{last_seq}); the copies "
                         f"made are kept: run the same command with --from-seq {last_seq + 1} to copy the rest")


def _check_room(db: sqlite3.Connection, plan: ReplayPlan, max_size: int) -> None:
    page_size, pages, free = (db.execute(f"PRAGMA {p}").fetchone()[0]
                              for p in ("page_size", "page_count", "freelist_count"))
    used = (pages - free) * page_size
    if used + plan.bytes > max_size:
        raise RelayError(f"the copies need about {plan.bytes / 1048576:.1f} MiB and the journal holds "
                         f"{used / 1048576:.1f} of its {max_size / 1048576:.1f} MiB (journal.max_size): narrow "
                         "the range with --since/--until, or raise journal.max_size")
