"""The durable journal: every accepted entry, each source's cursor, each destination's offset.

One writer connection, driven by one task, does all writes. Writes queue up while the previous commit
runs and then go out together in one transaction and one fsync (group commit); each caller is woken
only after that commit, so "submit returned" means "on disk". Each write runs inside its own savepoint,
so one failing write does not take the others down with it. Reads use their own connections (WAL lets
them run beside the writer). Every sqlite call runs in a worker thread through a `CapacityLimiter(1)`
per connection, never on the event loop.

When the disk is full (SQLITE_FULL), appends fail at once with `JournalUnavailable` (a push source
answers 503) while the relay's own bookkeeping (batch boundaries, offsets, states, plugin state) waits
for space and is retried, so deliveries in flight are recorded once space returns instead of taking the
relay down. A destination's state (for `relay status`) does not wait: it is written again later. Log
events: `journal_full`, `journal_resumed`, `journal_disk_full` (warning, once per episode),
`journal_disk_space_returned`, `journal_key_collision` (warning: an entry that cannot be deduplicated);
`journal_migrating` and `journal_migrated` come from `journal_schema`.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import orjson
import structlog
import trio
import trio.lowlevel

from relay.entry import EntryRow
from relay.errors import JournalError, JournalUnavailable
from relay.journal_schema import connect

__all__ = ["Journal", "JournalReader", "JournalStats", "PendingBatch", "Row"]

T = TypeVar("T")
log = structlog.get_logger("relay.journal")

PRUNE_INTERVAL = 10.0
REMOVED_KEEP = 7 * 86400.0
"""A removed destination's offset row is kept this long, in case it comes back, then forgotten."""
PRUNE_CHUNK = 20_000
CHECKPOINT_INTERVAL = 1.0
CHECKPOINT_EVERY_GROUPS = 64
"""The background checkpoint runs every second, or sooner after this many writes."""
FULL_RESUME_RATIO = 0.95
"""Once full, sources resume when the journal is back under 95 % of `max_size` (no flapping)."""
DISK_FULL_PAUSE = 1.0
"""After SQLITE_FULL, appends are refused and waiting writes retried after this long (nothing signals
that space has returned, so the disk is tried again)."""


@dataclass(frozen=True)
class JournalStats:
    last_seq: int
    used_bytes: int
    max_size: int
    full: bool
    disk_full: bool


Row = tuple[int, bytes, float, str, str, str | None, str]
"""An entry as a delivery loop reads it: `seq, data, occurred_at, action, actor_type, route, target_types`.

A plain tuple, as sqlite3 returns it: the first five are a `relay.Entry`'s fields, in its order; making a
named tuple of every row cost more (1 us each) than the query."""


@dataclass(frozen=True)
class PendingBatch:
    first_seq: int
    last_seq: int
    attributes: dict[str, str]
    done: bool


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    appends: bool
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    disk_full: bool = False
    retried: bool = False
    """A write tried again after the disk was full: its commit shows that space has returned."""


_ROW_COLUMNS = "seq, data, occurred_at, action, actor_type, route, target_types"


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "full" in str(exc) or getattr(exc, "sqlite_errorcode", None) == 13
    )


class Journal:
    def __init__(self, state_dir: Path, *, max_size: int, retention: float) -> None:
        self.state_dir = state_dir
        self.max_size = max_size
        self.retention = retention
        self._db: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._queue: list[_Op] = []
        self._wakeup = trio.Event()
        self._appended = trio.Event()
        self._writable = trio.Event()
        self._prune_now = trio.Event()
        self._checkpoint_now = trio.Event()
        self._since_checkpoint = 0
        self._running = False
        self._full = False
        self._disk_full_until = 0.0
        self._disk_full_since: float | None = None
        """Set from the first SQLITE_FULL until a write succeeds again (one warning per episode)."""
        self._last_seq = 0
        self._used = 0
        self.active_destinations: set[str] | None = None
        """Destinations whose offsets hold back pruning; None (nothing is pruned) until the owner says."""

    # -- life cycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        self._db = await trio.to_thread.run_sync(connect, self.state_dir, limiter=self._limiter)
        await trio.to_thread.run_sync(self._refresh_stats, limiter=self._limiter)
        self._update_full()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer and the pruner. Runs until cancelled; queued writes then fail as unavailable."""
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._prune_loop)
                nursery.start_soon(self._checkpoint_loop)
                task_status.started()
                try:
                    await self._write_loop()
                finally:
                    # Before waiting for the pruner: a write it queued as the writer was cancelled would
                    # otherwise wait (shielded) for a writer that is gone, and the nursery for the pruner.
                    self._stop_writes()
        finally:
            self._stop_writes()

    def _stop_writes(self) -> None:
        """Refuse new writes and fail the queued ones as unavailable."""
        self._running = False
        for op in self._queue:
            op.error = JournalUnavailable("the relay is stopping")
            op.done.set()
        self._queue.clear()

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await trio.to_thread.run_sync(db.close, limiter=self._limiter)

    # -- state --------------------------------------------------------------------------------------

    def statistics(self) -> JournalStats:
        return JournalStats(self._last_seq, self._used, self.max_size, self._full, self._disk_full())

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def running(self) -> bool:
        """True while the writer task runs (between `run()` starting and stopping)."""
        return self._running

    @property
    def writable(self) -> bool:
        return self._running and not self._full and not self._disk_full()

    def _disk_full(self) -> bool:
        return time.monotonic() < self._disk_full_until

    async def wait_writable(self) -> None:
        await trio.lowlevel.checkpoint()
        while not self.writable:
            if self._disk_full() and not self._full:
                await trio.sleep(self._disk_full_until - time.monotonic())
            else:
                await self._writable.wait()

    async def wait_appended(self, after_seq: int) -> None:
        """Return once the journal holds an entry after `after_seq`."""
        while self._last_seq <= after_seq:
            await self._appended.wait()

    # -- writing ------------------------------------------------------------------------------------

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, appends: bool = False,
                    wait_for_space: bool = True) -> T:
        """Run `fn(connection)` inside the next group transaction; return after it is committed.

        If the disk is full, try again every `DISK_FULL_PAUSE` until it commits (cancellable between
        tries), unless `wait_for_space` is off: then raise `JournalUnavailable` at once."""
        retried = False
        while True:
            if not self._running:
                raise JournalUnavailable("the relay is stopping")
            op = _Op(fn, appends, retried=retried)
            self._queue.append(op)
            self._wakeup.set()
            with trio.CancelScope(shield=True):  # the write is going out either way; report its outcome
                await op.done.wait()
            if op.error is None:
                return op.result  # type: ignore[no-any-return]
            if not (op.disk_full and wait_for_space):
                raise op.error
            retried = True
            await trio.sleep(max(0.0, self._disk_full_until - time.monotonic()))

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on the writer's connection (between group transactions)."""
        assert self._db is not None
        db = self._db
        return await trio.to_thread.run_sync(fn, db, limiter=self._limiter)

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            ops, self._queue = self._queue, []
            if not ops:
                continue
            completed = False
            try:
                await trio.to_thread.run_sync(self._run_group, ops, limiter=self._limiter)
                completed = True
            finally:
                if not completed:  # cancelled before the thread started: these writes never ran
                    for op in ops:
                        op.error = JournalUnavailable("the relay is stopping")
                        op.done.set()
            self._report_disk(ops)
            self._update_full()
            self._since_checkpoint += len(ops)
            if self._since_checkpoint >= CHECKPOINT_EVERY_GROUPS:
                self._checkpoint_now.set()
            if any(op.appends and op.error is None for op in ops):
                self._appended.set()
                self._appended = trio.Event()
            for op in ops:
                op.done.set()

    def _run_group(self, ops: Sequence[_Op]) -> None:
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail_all(ops, exc)
            return
        for op in ops:
            db.execute("SAVEPOINT op")
            try:
                op.result = op.fn(db)
                db.execute("RELEASE op")
            except Exception as exc:
                db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
                self._fail(op, exc)
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._fail_all([op for op in ops if op.error is None], exc)
        self._refresh_stats()

    def _fail_all(self, ops: Sequence[_Op], exc: BaseException) -> None:
        for op in ops:
            self._fail(op, exc)

    def _fail(self, op: _Op, exc: BaseException) -> None:
        if _is_disk_full(exc):
            self._disk_full_until = time.monotonic() + DISK_FULL_PAUSE
            op.disk_full = True
            op.error = JournalUnavailable("the journal's disk is full", retry_after=5.0)
        elif isinstance(exc, sqlite3.Error):
            op.error = JournalError(f"journal write failed: {exc}")
        else:
            op.error = exc

    def _report_disk(self, ops: Sequence[_Op]) -> None:
        """One warning when the disk fills up, one line when an append or a write that waited for space
        commits (a write that needs no new space, such as an empty prune, proves nothing)."""
        if any(op.disk_full for op in ops):
            if self._disk_full_since is None:
                self._disk_full_since = time.time()
                log.warning("journal_disk_full", state_dir=str(self.state_dir),
                            hint="sources are refused (push answers 503) and deliveries wait to be recorded "
                                 "until space is freed on this filesystem; nothing is dropped")
        elif self._disk_full_since is not None and any(op.error is None and (op.appends or op.retried) for op in ops):
            log.info("journal_disk_space_returned", full_for_seconds=round(time.time() - self._disk_full_since, 3))
            self._disk_full_since = None

    def _refresh_stats(self) -> None:
        db = self._db
        assert db is not None
        page_size, pages, free = (db.execute(f"PRAGMA {p}").fetchone()[0]
                                  for p in ("page_size", "page_count", "freelist_count"))
        self._used = (pages - free) * page_size
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        self._last_seq = row[0] if row else 0

    def _update_full(self) -> None:
        was = self._full
        if self._used >= self.max_size:
            self._full = True
        elif self._full and self._used < self.max_size * FULL_RESUME_RATIO:
            self._full = False
        if self._full and not was:
            log.warning("journal_full", used_bytes=self._used, max_size=self.max_size,
                        hint="sources are paused until destinations catch up; nothing is dropped")
            self._prune_now.set()
        elif was and not self._full:
            log.info("journal_resumed", used_bytes=self._used, max_size=self.max_size)
        if self.writable:
            self._writable.set()
            self._writable = trio.Event()

    # -- sources --------------------------------------------------------------------------------------

    async def append(self, source: str, entries: Sequence[EntryRow], quarantined: Sequence[tuple[str, bytes]],
                     cursor: Any, *, keep_cursor: bool) -> int:
        """Journal `entries` (deduplicated), `quarantined` input and the cursor in one transaction.

        Returns how many entries were new. Raises `JournalUnavailable` when intake must pause.
        """
        if not self.writable:
            if self._full:
                raise JournalUnavailable("the journal is full; destinations are catching up", retry_after=10.0)
            if self._disk_full():
                raise JournalUnavailable("the journal's disk is full", retry_after=5.0)
            raise JournalUnavailable("the journal cannot take entries right now", retry_after=5.0)
        now = time.time()

        def append(db: sqlite3.Connection) -> int:
            before = db.total_changes
            _insert_many(db, _INSERT_ENTRIES, entries, ENTRY_COLUMNS, (source, now))
            inserted = db.total_changes - before
            if inserted < len(entries):
                inserted += _keep_collisions(db, entries, source, now)
            if quarantined:
                db.executemany("INSERT INTO quarantine (source, received_at, reason, data) VALUES (?, ?, ?, ?)",
                               [(source, now, reason, data) for reason, data in quarantined])
            if keep_cursor:
                db.execute("INSERT INTO sources (name, last_success_at) VALUES (?, ?) ON CONFLICT (name)"
                           " DO UPDATE SET last_success_at = excluded.last_success_at", (source, now))
            else:
                db.execute("INSERT INTO sources (name, cursor, updated_at, last_success_at) VALUES (?, ?, ?, ?)"
                           " ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor,"
                           " updated_at = excluded.updated_at, last_success_at = excluded.last_success_at",
                           (source, cursor, now, now))
            return inserted

        return await self.write(append, appends=True, wait_for_space=False)

    async def load_cursor(self, source: str) -> str | None:
        return (await self.load_source(source))[0]

    async def load_source(self, source: str) -> tuple[str | None, float | None]:
        """The source's cursor and when it last succeeded (persisted, so metrics are right after a restart)."""
        row = await self.read(lambda db: db.execute("SELECT cursor, last_success_at FROM sources WHERE name = ?",
                                                     (source,)).fetchone())
        return (row[0], row[1]) if row else (None, None)

    # -- destinations -------------------------------------------------------------------------------

    async def register_destination(self, name: str, start_at: str) -> tuple[int, list[PendingBatch]]:
        """Create the destination's offset if new; return it with the batches left pending at the last stop."""
        def register(db: sqlite3.Connection) -> tuple[int, list[PendingBatch]]:
            row = db.execute('SELECT "offset" FROM destinations WHERE name = ?', (name,)).fetchone()
            if row is None:
                start = 0
                if start_at == "newest":
                    seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
                    start = seq[0] if seq else 0
                db.execute('INSERT INTO destinations (name, "offset", created_at, state_since)'
                           " VALUES (?, ?, ?, ?)", (name, start, time.time(), time.time()))
                return start, []
            _returning(db, name, row[0])
            pending = [PendingBatch(first, last, orjson.loads(attrs), bool(done)) for first, last, attrs, done in
                       db.execute("SELECT first_seq, last_seq, attributes, done FROM pending"
                                  " WHERE destination = ? ORDER BY first_seq", (name,))]
            return row[0], pending

        return await self.write(register)

    async def record_batch(self, destination: str, first: int, last: int, attributes: dict[str, str],
                           *, done: bool = False) -> int | None:
        """Record a new batch's boundaries; with `done` (nothing to send) also advance the offset."""
        def record(db: sqlite3.Connection) -> int | None:
            db.execute("INSERT INTO pending (destination, first_seq, last_seq, attributes, done, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       (destination, first, last, orjson.dumps(attributes).decode(), int(done), time.time()))
            return _advance(db, destination) if done else None

        return await self.write(record)

    async def finish_batch(self, destination: str, first: int, *, delivered: int, newest_occurred_at: float | None,
                           dead_letters: Sequence[tuple[int, str]] = (), resend_from: int | None = None) -> int | None:
        """Record the outcome of a batch: dead letters, counters, and either done (the offset advances
        over every leading done batch) or narrowed to start at `resend_from` (the rest is sent again).
        Returns the new offset if it moved."""
        def finish(db: sqlite3.Connection) -> int | None:
            now = time.time()
            if dead_letters:
                db.executemany(
                    "INSERT INTO dead_letters (destination, seq, source, occurred_at, action, failed_at, reason,"
                    " data) SELECT ?, seq, source, occurred_at, action, ?, ?, data FROM entries WHERE seq = ?",
                    [(destination, now, reason, seq) for seq, reason in dead_letters])
            if delivered:
                db.execute("UPDATE destinations SET delivered = delivered + ?, last_success_at = ?,"
                           " last_occurred_at = max(coalesce(last_occurred_at, 0), ?) WHERE name = ?",
                           (delivered, now, newest_occurred_at or 0, destination))
            if resend_from is not None:
                db.execute("UPDATE pending SET first_seq = ? WHERE destination = ? AND first_seq = ?",
                           (resend_from, destination, first))
                return None
            db.execute("UPDATE pending SET done = 1 WHERE destination = ? AND first_seq = ?", (destination, first))
            return _advance(db, destination)

        return await self.write(finish)

    async def load_destination(self, name: str) -> tuple[float | None, float | None, int]:
        """(last_success_at, newest occurred_at delivered, dead letters held) as persisted."""
        def load(db: sqlite3.Connection) -> tuple[float | None, float | None, int]:
            row = db.execute("SELECT last_success_at, last_occurred_at FROM destinations WHERE name = ?",
                             (name,)).fetchone()
            dead = db.execute("SELECT count(*) FROM dead_letters WHERE destination = ?", (name,)).fetchone()[0]
            return (row[0] or None, row[1] or None, dead) if row else (None, None, dead)

        return await self.read(load)

    async def mark_removed(self, keep: Sequence[str]) -> list[str]:
        """Mark every destination not in `keep` as removed (its row is kept `REMOVED_KEEP`); returns the
        names newly marked."""
        def mark(db: sqlite3.Connection) -> list[str]:
            names = [r[0] for r in db.execute("SELECT name FROM destinations WHERE removed_at IS NULL")
                     if r[0] not in keep]
            db.executemany("UPDATE destinations SET removed_at = ? WHERE name = ?", [(time.time(), n) for n in names])
            return names

        return await self.write(mark)

    async def dead_letter_counts(self) -> dict[str, int]:
        return dict(await self.read(lambda db: db.execute(
            "SELECT destination, count(*) FROM dead_letters GROUP BY destination").fetchall()))

    async def set_destination_state(self, destination: str, state: str, reason: str | None) -> None:
        """Record a destination's state for `relay status`. Never waits for disk space (raises
        `JournalUnavailable` instead): delivery must go on while the disk is full."""
        await self.write(lambda db: db.execute(
            "UPDATE destinations SET state = ?, state_reason = ?, state_since = ? WHERE name = ?",
            (state, reason, time.time(), destination)), wait_for_space=False)

    # -- plugin state and quarantine ------------------------------------------------------------------

    async def load_state(self, owner: str, key: str) -> str | None:
        row = await self.read(lambda db: db.execute(
            "SELECT value FROM plugin_state WHERE owner = ? AND key = ?", (owner, key)).fetchone())
        return row[0] if row else None

    async def save_state(self, owner: str, key: str, value: str) -> None:
        await self.write(lambda db: db.execute(
            "INSERT INTO plugin_state VALUES (?, ?, ?) ON CONFLICT (owner, key) DO UPDATE SET value = excluded.value",
            (owner, key, value)))

    async def quarantine(self, source: str, reason: str, data: bytes) -> None:
        await self.write(lambda db: db.execute(
            "INSERT INTO quarantine (source, received_at, reason, data) VALUES (?, ?, ?, ?)",
            (source, time.time(), reason, data)), wait_for_space=False)

    # -- pruning --------------------------------------------------------------------------------------

    async def _prune_loop(self) -> None:
        while True:
            with trio.move_on_after(PRUNE_INTERVAL):
                await self._prune_now.wait()
            self._prune_now = trio.Event()
            try:
                await self.write(_forget_removed, wait_for_space=False)
                while await self.write(self._prune_chunk, wait_for_space=False):
                    await trio.lowlevel.checkpoint()  # let other writes in between chunks
            except JournalUnavailable:
                if not self._running:
                    return  # the writer has stopped: so does pruning
                # (disk full: try again at the next interval; pruning is what frees the space)

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database from a connection of its own, in a thread beside the writer.

        SQLite's automatic checkpoint would run inside the writer's commits and stall every source while
        it copies pages; a PASSIVE checkpoint here never blocks the writer (and releases the GIL while
        it works)."""
        checkpointer: sqlite3.Connection | None = None
        limiter = trio.CapacityLimiter(1)
        try:
            while True:
                with trio.move_on_after(CHECKPOINT_INTERVAL):
                    await self._checkpoint_now.wait()
                self._checkpoint_now = trio.Event()
                self._since_checkpoint = 0
                if checkpointer is None:
                    checkpointer = await trio.to_thread.run_sync(connect, self.state_dir, limiter=limiter)
                try:
                    await trio.to_thread.run_sync(_checkpoint, checkpointer, limiter=limiter)
                except sqlite3.Error as exc:  # e.g. the disk is full; the next round tries again
                    log.warning("journal_checkpoint_failed", error=str(exc))
        finally:
            if checkpointer is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(checkpointer.close, limiter=limiter)

    def request_prune(self) -> None:
        self._prune_now.set()

    def _prune_chunk(self, db: sqlite3.Connection) -> int:
        """Delete up to one chunk of entries every active destination is done with and that are past
        retention (or any such entries while the journal is over 90 % full). Returns rows deleted."""
        if self.active_destinations is None:  # not known yet: pruning now could delete undelivered entries
            return 0
        names = sorted(self.active_destinations)
        if names:
            marks = ",".join("?" * len(names))
            row = db.execute(f'SELECT min("offset") FROM destinations WHERE name IN ({marks})', names).fetchone()
            floor = row[0] if row and row[0] is not None else 0
        else:
            floor = self._last_seq
        pressure = self._used >= self.max_size * 0.9
        cutoff = time.time() if pressure else time.time() - self.retention
        deleted = db.execute(
            "DELETE FROM entries WHERE seq IN (SELECT seq FROM entries WHERE seq <= ? ORDER BY seq LIMIT ?)"
            " AND received_at <= ?", (floor, PRUNE_CHUNK, cutoff)).rowcount
        return deleted


def _returning(db: sqlite3.Connection, name: str, offset: int) -> None:
    """A destination configured again after its removal: clear the mark, and say clearly if entries it
    never received were pruned meanwhile (a removed destination does not hold pruning back)."""
    removed = db.execute("SELECT removed_at FROM destinations WHERE name = ?", (name,)).fetchone()[0]
    if removed is None:
        return
    db.execute("UPDATE destinations SET removed_at = NULL WHERE name = ?", (name,))
    head = db.execute("SELECT min(seq) FROM entries WHERE seq > ?", (offset,)).fetchone()[0]
    if head is None:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        missing_to = row[0] if row else 0
    else:
        missing_to = head - 1
    if missing_to > offset:
        log.warning("destination_gap", destination=name, first_seq=offset + 1, last_seq=missing_to,
                    entries=missing_to - offset, removed_at=removed,
                    hint="these entries were pruned while the destination was removed and cannot be sent")
    else:
        log.info("destination_returned", destination=name, offset=offset)


def _forget_removed(db: sqlite3.Connection) -> None:
    """Drop the offset and pending batches of destinations removed more than `REMOVED_KEEP` ago (their
    dead letters stay until an operator purges them)."""
    cutoff = time.time() - REMOVED_KEEP
    names = [r[0] for r in db.execute("SELECT name FROM destinations WHERE removed_at < ?", (cutoff,))]
    for name in names:
        db.execute("DELETE FROM pending WHERE destination = ?", (name,))
        db.execute("DELETE FROM destinations WHERE name = ?", (name,))
        log.info("removed_destination_forgotten", destination=name)


STATEMENT_ROWS = 512
_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
ENTRY_COLUMNS = 7
"""What `_insert_many` takes of each `EntryRow`: key, digest, data, occurred_at, action, actor_type,
target_types (in that order, so the rows are bound as they come, without a tuple made for each)."""
_INSERT_ENTRIES = ("INSERT OR IGNORE INTO entries (key, digest, data, occurred_at, action, actor_type, target_types,"
                   " source, received_at) SELECT *, ?, ? FROM (VALUES {values})")
"""`source` and `received_at` are the same for the whole append: bound once per statement, not per row."""


def _insert_many(db: sqlite3.Connection, insert: str, rows: Sequence[Sequence[Any]], width: int,
                 constants: tuple[Any, ...] = ()) -> None:
    """Insert the first `width` values of each of `rows` with a few multi-row statements of fixed shapes.

    `insert` has a `{values}` placeholder for the rows' `(?,...),...` and may bind `constants` before it.

    `executemany` runs one step per row, and the sqlite3 module releases the GIL around every step: while
    the event loop's thread is busy (validating the next request, say), each of those steps waits for the
    GIL (up to the 5 ms switch interval), which measured 167 rows/s instead of 77,000. One multi-row
    statement is one step. Its shapes are fixed (`STATEMENT_ROWS` rows, then powers of two for the rest):
    the sqlite3 module caches each distinct statement compiled, and a statement for every batch size seen
    held ~1 MiB each, up to its cache of 128 (130 MiB measured during an import)."""
    if not rows:
        return
    size = min(STATEMENT_ROWS, (_MAX_VARIABLES - len(constants)) // width)
    start = 0
    while start < len(rows):
        left = len(rows) - start
        count = size if left >= size else 1 << (left.bit_length() - 1)
        part = rows[start:start + count]
        db.execute(_statement(insert, width, count), [*constants, *chain.from_iterable(row[:width] for row in part)])
        start += count


@functools.cache
def _statement(insert: str, width: int, count: int) -> str:
    """`insert` with its `(?,?),(?,?),...`: built once per shape (a 512-row one is ~10 KB of text)."""
    return insert.format(values=",".join(["(" + ",".join("?" * width) + ")"] * count))


COLLISION_PROBES = 16
"""Keys an entry whose own key is taken by a different entry may use instead: `key ^ 1` ... `key ^ 15`."""


def _keep_collisions(db: sqlite3.Connection, entries: Sequence[EntryRow], source: str, now: float) -> int:
    """Some entries were ignored as duplicates. One whose key is taken by an entry with a different digest
    is not a duplicate of it: unless one of the other keys it may use holds its copy, it takes the first free
    one (where a later copy finds it, and is deduplicated), or, with all taken, none (kept, but a later copy
    of it would be journaled again). A key collision never loses an entry."""
    kept = 0
    for key, digest, data, occurred_at, action, actor_type, target_types, *_ in entries:
        found = db.execute("SELECT digest FROM entries WHERE key = ?", (key,)).fetchone()
        if found is None or found[0] == digest:
            continue  # inserted, or a duplicate
        probes = [key ^ probe for probe in range(1, COLLISION_PROBES)]
        held = dict(db.execute(f"SELECT key, digest FROM entries WHERE key IN ({','.join('?' * len(probes))})",
                               probes).fetchall())  # all of them: an entry between may have been pruned
        if digest in held.values():
            continue  # a duplicate of an entry that collided before
        free = next((probe for probe in probes if probe not in held), None)
        db.execute("INSERT INTO entries (key, digest, source, received_at, occurred_at, action, actor_type,"
                   " target_types, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (free, digest, source, now, occurred_at, action, actor_type, target_types, data))
        kept += 1
        if free is None:
            log.warning("journal_key_collision", key=key,
                        hint=f"{COLLISION_PROBES} different entries share a dedupe key; all are kept, but this "
                             "one will not be deduplicated")
    return kept


def _checkpoint(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()


def _advance(db: sqlite3.Connection, destination: str) -> int | None:
    """Move the offset over the leading run of done batches; returns the new offset if it moved."""
    offset = None
    for first, last, done in db.execute(
            "SELECT first_seq, last_seq, done FROM pending WHERE destination = ? ORDER BY first_seq",
            (destination,)).fetchall():
        if not done:
            break
        offset = last
        db.execute("DELETE FROM pending WHERE destination = ? AND first_seq = ?", (destination, first))
    if offset is not None:
        db.execute('UPDATE destinations SET "offset" = ? WHERE name = ?', (offset, destination))
    return offset


READER_CACHE_KIB = 2048


class JournalReader:
    """A read connection for one delivery loop."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._db: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[Row]:
        if self._db is None:
            # It reads forward through the journal, each page once: a large cache would only fill up (16 MiB
            # of a 1M-entry drain's peak RSS, measured) with pages it never reads again.
            self._db = connect(self._state_dir, readonly=True, cache_kib=READER_CACHE_KIB)
        return self._db.execute(sql, args).fetchall()

    async def read_after(self, after_seq: int, limit: int) -> list[Row]:
        return await trio.to_thread.run_sync(
            self._query, f"SELECT {_ROW_COLUMNS} FROM entries WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit), limiter=self._limiter)

    async def read_range(self, first: int, last: int) -> list[Row]:
        return await trio.to_thread.run_sync(
            self._query, f"SELECT {_ROW_COLUMNS} FROM entries WHERE seq BETWEEN ? AND ? ORDER BY seq",
            (first, last), limiter=self._limiter)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await trio.to_thread.run_sync(db.close, limiter=self._limiter)


class JournalStateStore:
    """`StateStore` for one plugin instance, kept in the journal's `plugin_state` table."""

    def __init__(self, journal: Journal, owner: str) -> None:
        self._journal = journal
        self._owner = owner

    async def load(self, key: str) -> str | None:
        return await self._journal.load_state(self._owner, key)

    async def save(self, key: str, value: str) -> None:
        await self._journal.save_state(self._owner, key, value)
