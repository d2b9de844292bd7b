"""Operator actions on the journal from the command line: status, dead letters, quarantine, cursors.

These run in their own process beside a running relay (SQLite WAL allows it); a running relay sees
replayed dead letters within a few seconds. Setting a cursor is the exception: a running source keeps its
cursor in memory and would overwrite the new value with its next commit, so `cursor_set` takes the
state dir's pid-file lock for the change and refuses while a relay runs (and no relay can start meanwhile).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from relay.entry import prepare
from relay.journal_schema import JOURNAL_FILE, connect
from relay.pidfile import PidFile, holder


@contextmanager
def open_journal(state_dir: Path, *, readonly: bool = True) -> Iterator[sqlite3.Connection]:
    db = connect(state_dir, readonly=readonly)
    try:
        yield db
    finally:
        db.close()


def status(state_dir: Path, configured: dict[str, str] | None = None, now: float | None = None) -> dict[str, Any]:
    """Everything `relay status` shows, as plain data (`--json` prints it as is)."""
    now = time.time() if now is None else now
    running = holder(state_dir)
    with open_journal(state_dir) as db:
        last_seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        last_seq = last_seq_row[0] if last_seq_row else 0
        page_size, pages, free = (db.execute(f"PRAGMA {p}").fetchone()[0]
                                  for p in ("page_size", "page_count", "freelist_count"))
        dead = dict(db.execute("SELECT destination, count(*) FROM dead_letters GROUP BY destination").fetchall())
        pending = dict(db.execute("SELECT destination, count(*) FROM pending WHERE done = 0"
                                  " GROUP BY destination").fetchall())
        destinations = []
        for (name, offset, state, reason, since, delivered, last_success, last_occurred, removed) in db.execute(
                'SELECT name, "offset", state, state_reason, state_since, delivered, last_success_at,'
                " last_occurred_at, removed_at FROM destinations ORDER BY name"):
            head = db.execute("SELECT occurred_at FROM entries WHERE seq > ? ORDER BY seq LIMIT 1",
                              (offset,)).fetchone()
            destinations.append({
                "name": name,
                "type": (configured or {}).get(name),
                "state": "removed" if removed else state,
                "state_reason": reason,
                "state_since": iso(since),
                "offset": offset,
                "backlog": max(0, last_seq - offset),
                "batches_in_flight": pending.get(name, 0),
                "delivered": delivered,
                "dead_letters": dead.get(name, 0),
                "last_success_at": iso(last_success),
                "newest_delivered_occurred_at": iso(last_occurred),
                "lag_seconds": round(now - last_occurred, 3) if last_occurred else None,
                "oldest_undelivered_occurred_at": iso(head[0]) if head else None,
                "oldest_undelivered_age_seconds": round(max(0.0, now - head[0]), 3) if head else 0.0,
            })
        sources = [{"name": name, "cursor": cursor, "cursor_updated_at": iso(updated),
                    "last_success_at": iso(last_success)}
                   for name, cursor, updated, last_success in
                   db.execute("SELECT name, cursor, updated_at, last_success_at FROM sources ORDER BY name")]
        quarantined = db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    return {
        "relay": {"running": running is not None and running.what == "run",
                  "pid": running.pid if running is not None else None,
                  "holder": f"relay {running.what}" if running is not None else None},
        "journal": {"path": str(state_dir / JOURNAL_FILE), "last_seq": last_seq,
                    "used_bytes": (pages - free) * page_size, "quarantined": quarantined},
        "destinations": destinations,
        "sources": sources,
    }


def iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def dlq_list(state_dir: Path, destination: str, limit: int = 100) -> list[dict[str, Any]]:
    with open_journal(state_dir) as db:
        return [{"id": i, "seq": seq, "source": source, "action": action, "occurred_at": iso(occurred),
                 "failed_at": iso(failed), "reason": reason}
                for i, seq, source, action, occurred, failed, reason in db.execute(
                    "SELECT id, seq, source, action, occurred_at, failed_at, reason FROM dead_letters"
                    " WHERE destination = ? ORDER BY id LIMIT ?", (destination, limit))]


def dlq_show(state_dir: Path, destination: str, ids: list[int] | None) -> list[tuple[int, str, bytes]]:
    with open_journal(state_dir) as db:
        return list(db.execute(
            "SELECT id, reason, data FROM dead_letters WHERE destination = ?" + _id_filter(ids) + " ORDER BY id",
            (destination, *(ids or []))))


def dlq_replay(state_dir: Path, destination: str, ids: list[int] | None) -> int:
    """Put dead letters back in the destination's queue (as new journal entries only it receives)."""
    with open_journal(state_dir, readonly=False) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            where = "destination = ?" + _id_filter(ids)
            args = (destination, *(ids or []))
            rows = db.execute(f"SELECT source, data FROM dead_letters WHERE {where} ORDER BY id", args).fetchall()
            reroute(db, destination, rows)
            db.execute(f"DELETE FROM dead_letters WHERE {where}", args)
            db.execute("COMMIT")
            return len(rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise


def reroute(db: sqlite3.Connection, destination: str, rows: list[tuple[str, bytes]]) -> None:
    """Append copies of entries that only `destination` receives (not deduplicated: they are re-sends)."""
    now = time.time()
    values = []
    for source, data in rows:
        entry = prepare(orjson.loads(data))
        values.append((source, destination, now, entry.occurred_at, entry.action, entry.actor_type,
                       entry.target_types, data))
    db.executemany(
        "INSERT INTO entries (key, source, route, received_at, occurred_at, action, actor_type, target_types,"
        " data) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)", values)


def dlq_purge(state_dir: Path, destination: str, ids: list[int] | None) -> int:
    with open_journal(state_dir, readonly=False) as db:
        return db.execute("DELETE FROM dead_letters WHERE destination = ?" + _id_filter(ids),
                          (destination, *(ids or []))).rowcount


def quarantine_list(state_dir: Path, source: str | None, limit: int = 100) -> list[dict[str, Any]]:
    with open_journal(state_dir) as db:
        where, args = ("WHERE source = ?", (source,)) if source else ("", ())
        return [{"id": i, "source": s, "received_at": iso(received), "reason": reason, "bytes": size}
                for i, s, received, reason, size in db.execute(
                    f"SELECT id, source, received_at, reason, length(data) FROM quarantine {where}"
                    " ORDER BY id LIMIT ?", (*args, limit))]


def quarantine_show(state_dir: Path, ids: list[int]) -> list[tuple[int, str, bytes]]:
    with open_journal(state_dir) as db:
        return list(db.execute("SELECT id, reason, data FROM quarantine WHERE 1 = 1" + _id_filter(ids), ids))


def cursor_show(state_dir: Path, source: str) -> dict[str, Any] | None:
    with open_journal(state_dir) as db:
        row = db.execute("SELECT cursor, updated_at, last_success_at FROM sources WHERE name = ?",
                         (source,)).fetchone()
    if row is None:
        return None
    return {"source": source, "cursor": row[0], "updated_at": iso(row[1]), "last_success_at": iso(row[2])}


def cursor_set(state_dir: Path, source: str, value: str | None) -> None:
    """Set (or with None, clear) a source's cursor; raises `StateDirBusy` while a relay runs."""
    with PidFile.acquire(state_dir, "cursor set"), open_journal(state_dir, readonly=False) as db:
        db.execute("INSERT INTO sources (name, cursor, updated_at) VALUES (?, ?, ?) ON CONFLICT (name)"
                   " DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
                   (source, value, time.time()))


def _id_filter(ids: list[int] | None) -> str:
    return f" AND id IN ({','.join('?' * len(ids))})" if ids else ""
