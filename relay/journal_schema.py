"""The journal's SQLite schema, its migrations, and how a connection is opened.

Each migration runs in the same transaction as the row that records it, so a crash mid-migration leaves
the previous schema intact.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from relay.entry import stored_dedupe_key
from relay.errors import JournalError

log = structlog.get_logger("relay.journal")

JOURNAL_FILE = "journal.sqlite3"
WRITER_AUTOCHECKPOINT_BYTES = 64 * 1024 * 1024
"""Of WAL: only reached if the background checkpointer falls behind."""


def m001_initial(db: sqlite3.Connection) -> None:
    db.executescript(
        """
        CREATE TABLE entries (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after pruning
            key          INTEGER UNIQUE,    -- first 64 bits of the identity digest; NULL for re-deliveries
            digest       BLOB,              -- the whole SHA-256 identity digest, to tell a collision of
                                            -- `key` from a true duplicate
            source       TEXT NOT NULL,
            route        TEXT,              -- NULL: every destination; else only this one (replays)
            received_at  REAL NOT NULL,
            occurred_at  REAL NOT NULL,
            action       TEXT NOT NULL,
            actor_type   TEXT NOT NULL,
            target_types TEXT NOT NULL,
            data         BLOB NOT NULL
        );
        CREATE TABLE sources (
            name         TEXT PRIMARY KEY,
            cursor       TEXT,
            updated_at   REAL,
            last_success_at REAL
        );
        CREATE TABLE destinations (
            name             TEXT PRIMARY KEY,
            "offset"         INTEGER NOT NULL,  -- every entry up to here is done for this destination
            created_at       REAL NOT NULL,
            state            TEXT NOT NULL DEFAULT 'up',
            state_reason     TEXT,
            state_since      REAL,
            delivered        INTEGER NOT NULL DEFAULT 0,
            last_success_at  REAL,
            last_occurred_at REAL,             -- newest occurred_at delivered: the freshness
            removed_at       REAL
        );
        CREATE TABLE pending (                 -- batch boundaries recorded before the first attempt
            destination TEXT NOT NULL,
            first_seq   INTEGER NOT NULL,
            last_seq    INTEGER NOT NULL,
            attributes  TEXT NOT NULL DEFAULT '{}',
            done        INTEGER NOT NULL DEFAULT 0,
            created_at  REAL NOT NULL,
            PRIMARY KEY (destination, first_seq)
        ) WITHOUT ROWID;
        CREATE TABLE dead_letters (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            destination TEXT NOT NULL,
            seq         INTEGER NOT NULL,
            source      TEXT NOT NULL,
            occurred_at REAL NOT NULL,
            action      TEXT NOT NULL,
            failed_at   REAL NOT NULL,
            reason      TEXT NOT NULL,
            data        BLOB NOT NULL
        );
        CREATE INDEX dead_letters_by_destination ON dead_letters (destination, id);
        CREATE TABLE quarantine (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            source      TEXT NOT NULL,
            received_at REAL NOT NULL,
            reason      TEXT NOT NULL,
            data        BLOB NOT NULL
        );
        CREATE TABLE plugin_state (
            owner TEXT NOT NULL,
            key   TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (owner, key)
        ) WITHOUT ROWID;
        """
    )


def m002_time_ordered_keys(db: sqlite3.Connection) -> None:
    """Dedupe keys from `relay.entry.dedupe_key`, which puts the time of a ULID or UUIDv7 id, or of an
    entry without an id, first (before: 64 bits of the digest, scattered over the whole index). One pass,
    as each pass rewrites every row (~20 s for 1M entries). Should a new key meet an old one not yet
    rewritten, or two entries share a new key, the row keeps its old key: nothing is lost, but a copy of
    that entry sent again would be journaled again (the chance is that of two entries sharing a key at
    insert time, see `_keep_collisions`)."""
    db.executescript(
        """
        UPDATE OR IGNORE entries SET key = relay_dedupe_key(digest, data, occurred_at) WHERE route IS NULL
        """
    )


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("m001_initial", m001_initial),
    ("m002_time_ordered_keys", m002_time_ordered_keys),
]


def connect(state_dir: Path, *, readonly: bool = False, cache_kib: int = 16_000) -> sqlite3.Connection:
    """Open (and if needed create and migrate) the journal in `state_dir`, with a page cache of `cache_kib`."""
    path = state_dir / JOURNAL_FILE
    try:
        if readonly:
            if not path.exists():
                raise JournalError(f"no journal at {path} (has the relay run with this state_dir?)")
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                 check_same_thread=False, timeout=10)
        else:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # The journal's own checkpointer runs beside the writer (journal.py); this is the safety net.
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_BYTES // page_size}")
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        # Each write of a group commit runs in a savepoint, whose undo copies of pages SQLite keeps in a
        # statement journal: a temporary file by default, two pwrite() calls per page (measured: 102,000
        # of them for a 200,000-entry import). In memory they are a copy; a savepoint holds a few MiB.
        db.execute("PRAGMA temp_store=MEMORY")
        if not readonly:
            db.create_function("relay_dedupe_key", 3, stored_dedupe_key, deterministic=True)  # for m002
            _migrate(db)
        return db
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"cannot open the journal {path}: {exc}") from exc


def _migrate(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    applied = {row[0] for row in db.execute("SELECT name FROM migrations")}
    known = {name for name, _ in MIGRATIONS}
    if applied - known:
        raise JournalError(f"the journal was written by a newer audit-relay (migrations {sorted(applied - known)})")
    for name, step in MIGRATIONS:
        if name in applied:
            continue
        entries = db.execute("SELECT count(*) FROM entries").fetchone()[0] if "m001_initial" in applied else 0
        if entries:
            log.info("journal_migrating", migration=name, entries=entries,
                     hint="once, after an upgrade; a large journal takes a while (~20 s per million entries)")
        started = time.monotonic()
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(step):
                db.execute(statement)
            db.execute("INSERT INTO migrations VALUES (?, julianday('now'))", (name,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if entries:  # the WAL now holds a copy of what the migration rewrote: give that space back
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            log.info("journal_migrated", migration=name, seconds=round(time.monotonic() - started, 3))


def _statements(step: Callable[[sqlite3.Connection], None]) -> list[str]:
    """A migration's statements, so they run inside our transaction (`executescript` would commit)."""
    recorder = _Recorder()
    step(recorder)  # type: ignore[arg-type]
    return recorder.statements


class _Recorder:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def executescript(self, script: str) -> None:
        self.statements.extend(s.strip() for s in script.split(";\n") if s.strip())

    def execute(self, statement: str) -> None:
        self.statements.append(statement)
