"""Operator actions on the journal from the command line: status, dead letters, quarantine.

These run in their own process beside a running relay (SQLite WAL allows it); a running relay sees
replayed dead letters within a few seconds.
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


@contextmanager
def open_journal(state_dir: Path, *, readonly: bool = True) -> Iterator[sqlite3.Connection]:
    db = connect(state_dir, readonly=readonly)
    try:
        yield db
    finally:
        db.close()


def status(state_dir: Path, configured: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything `relay status` shows, as plain data (`--json` prints it as is)."""
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
            destinations.append({
                "name": name,
                "type": (configured or {}).get(name),
                "state": "removed" if removed else state,
                "state_reason": reason,
                "state_since": _iso(since),
                "offset": offset,
                "backlog": max(0, last_seq - offset),
                "batches_in_flight": pending.get(name, 0),
                "delivered": delivered,
                "dead_letters": dead.get(name, 0),
                "last_success_at": _iso(last_success),
                "newest_delivered_occurred_at": _iso(last_occurred),
            })
        sources = [{"name": name, "cursor": cursor, "cursor_updated_at": _iso(updated),
                    "last_success_at": _iso(last_success)}
                   for name, cursor, updated, last_success in
                   db.execute("SELECT name, cursor, updated_at, last_success_at FROM sources ORDER BY name")]
        quarantined = db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    return {
        "journal": {"path": str(state_dir / JOURNAL_FILE), "last_seq": last_seq,
                    "used_bytes": (pages - free) * page_size, "quarantined": quarantined},
        "destinations": destinations,
        "sources": sources,
    }


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def dlq_list(state_dir: Path, destination: str, limit: int = 100) -> list[dict[str, Any]]:
    with open_journal(state_dir) as db:
        return [{"id": i, "seq": seq, "source": source, "action": action, "occurred_at": _iso(occurred),
                 "failed_at": _iso(failed), "reason": reason}
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
        return [{"id": i, "source": s, "received_at": _iso(received), "reason": reason, "bytes": size}
                for i, s, received, reason, size in db.execute(
                    f"SELECT id, source, received_at, reason, length(data) FROM quarantine {where}"
                    " ORDER BY id LIMIT ?", (*args, limit))]


def quarantine_show(state_dir: Path, ids: list[int]) -> list[tuple[int, str, bytes]]:
    with open_journal(state_dir) as db:
        return list(db.execute("SELECT id, reason, data FROM quarantine WHERE 1 = 1" + _id_filter(ids), ids))


def _id_filter(ids: list[int] | None) -> str:
    return f" AND id IN ({','.join('?' * len(ids))})" if ids else ""
