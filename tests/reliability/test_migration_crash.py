"""A relay killed (-9) while it migrates its journal to this version's format: the journal holds the one
format or the other, never a mix, and the next start migrates it and still deduplicates what it held."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relay import journal_schema
from relay.entry import _id_digest, dedupe_key
from relay.journal_schema import JOURNAL_FILE
from tests.helpers import RelayProcess, config_dict, free_port, journal_db, wait_until_sync, write_config
from tests.reliability.leaks import ENV, Leaks
from tests.reliability.pusher import Pusher, numbered

ENTRIES = 200_000
"""Enough that migrating takes a second or more here, so the kill lands in the middle of it."""


def old_key(digest: bytes) -> int:
    """The key before migration m002: the digest's first 64 bits."""
    return int.from_bytes(digest[:8], "big", signed=True)


def write_old_journal(state: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes]]:
    """A journal as the previous version left it (only m001, keys from the digest); returns (key, digest)."""
    monkeypatch.setattr(journal_schema, "MIGRATIONS", journal_schema.MIGRATIONS[:1])
    db = journal_schema.connect(state)
    rows = []
    for i in range(ENTRIES):
        entry_id = f"crash-{i:06d}"
        digest = _id_digest(entry_id)
        data = b'{"id":"%s","action":"user.created","occurred_at":"2024-05-14T09:30:00Z",' % entry_id.encode()
        rows.append((old_key(digest), digest, "push", time.time(), 1715679000.0 + i, "user.created", "user", "",
                     data + b'"actor":{"type":"user","id":"u"}}'))
    db.execute("BEGIN")
    db.executemany("INSERT INTO entries (key, digest, source, received_at, occurred_at, action, actor_type,"
                   " target_types, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    db.close()
    monkeypatch.undo()
    return [(row[0], row[1]) for row in rows]


def test_a_kill_during_the_journal_migration_leaves_one_format_and_the_next_start_finishes_it(
        tmp_path: Path, leaks: Leaks, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir()
    written = write_old_journal(state, monkeypatch)
    new_keys = {digest: dedupe_key(digest, f"crash-{i:06d}", 0) for i, (_, digest) in enumerate(written)}
    port = free_port()
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, {"push": {"type": "http", "listen": f"127.0.0.1:{port}",
                            "auth": {"bearer_tokens": ["${RECEIVER_TOKEN}"]}}}))
    relay = RelayProcess(config, leaks.file("relay log", tmp_path / "relay.log"), env=ENV)
    pusher = Pusher(f"http://127.0.0.1:{port}/v1/entries")
    try:
        relay.start(wait_ready=False)
        wal = state / f"{JOURNAL_FILE}-wal"  # grows as the migration rewrites the entries: kill it then
        wait_until_sync(lambda: (wal.exists() and wal.stat().st_size > 4 << 20)
                        or (relay.proc is not None and relay.proc.poll() is not None), 60, "migration writes")
        relay.kill()
        assert any(e.get("event") == "journal_migrating" for e in relay.events())

        with journal_db(state) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            migrated = ("m002_time_ordered_keys",) in db.execute("SELECT name FROM migrations").fetchall()
            keys = dict((digest, key) for key, digest in db.execute("SELECT key, digest FROM entries"))
        expected = new_keys if migrated else {digest: key for key, digest in written}
        assert keys == expected, f"a mix of formats ({'after' if migrated else 'before'} the migration's commit)"

        relay.start(timeout=120)
        assert [e["entries"] for e in relay.events(since_start=True) if e.get("event") == "journal_migrating"] == (
            [] if migrated else [ENTRIES])
        copies = [numbered("crash", i) for i in (0, 1, ENTRIES // 2, ENTRIES - 1)]
        assert pusher.push(copies) == 200
        assert relay.terminate() == 0
    finally:
        relay.stop_quietly()
        pusher.close()
    with journal_db(state) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == ENTRIES, "the copies were duplicates"
        assert dict((digest, key) for key, digest in db.execute("SELECT key, digest FROM entries")) == new_keys
    print(f"\nmigration: killed {'after its commit' if migrated else 'before its commit'}; "
          f"{ENTRIES:,} entries migrated at the next start, the copies sent again deduplicated")
