"""Durability, tested the only honest way: `kill -9` the relay while entries flow, restart, compare."""

from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter
from pathlib import Path

from tests.helpers import RelayProcess, config_dict, journal_db, wait_until_sync, write_config

KILLS = 6


def _journal_state(state_dir: Path) -> tuple[int, int, int, str]:
    """(entries from the demo source, the demo cursor, the destination offset, integrity_check)."""
    with journal_db(state_dir) as db:
        count = db.execute("SELECT count(*) FROM entries WHERE source = 'demo'").fetchone()[0]
        cursor = db.execute("SELECT cursor FROM sources WHERE name = 'demo'").fetchone()
        offset = db.execute("SELECT \"offset\" FROM destinations WHERE name = 'out'").fetchone()
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    return count, int(cursor[0]) if cursor else 0, offset[0] if offset else 0, integrity


def test_kill_9_while_entries_flow_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    output = tmp_path / "out.jsonl"
    total = 12_000
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path,
        sources={"demo": {"type": "demo", "rate": 3000, "count": total}},
        destinations={"out": {"type": "file", "path": str(output), "batch": {"max_entries": 500}}},
    ))
    relay = RelayProcess(config, tmp_path / "relay.log")
    rng = random.Random()
    try:
        for kill in range(KILLS):
            relay.start()
            time.sleep(rng.uniform(0.2, 1.2))  # a random moment to kill at, not synchronisation
            relay.kill()
            count, cursor, offset, integrity = _journal_state(state)
            assert integrity == "ok", f"journal damaged after kill {kill + 1}"
            assert count == cursor, "entries and the source cursor are committed in one transaction"
            assert offset <= count
        relay.start()

        def caught_up() -> bool:
            count, _, offset, _ = _journal_state(state)
            return count == total and offset >= count

        wait_until_sync(caught_up, 120, "every entry produced and delivered")
        assert relay.terminate() == 0
    finally:
        relay.stop_quietly()

    with journal_db(state) as db:
        journaled = [row[0] for row in db.execute("SELECT data FROM entries WHERE source = 'demo' ORDER BY seq")]
    written = Counter(output.read_bytes().splitlines())
    missing = [data for data in journaled if data not in written]
    duplicates = sum(n - 1 for n in written.values())
    print(f"\nkill test: {len(journaled)} journaled, {sum(written.values())} lines written, "
          f"{duplicates} duplicates after {KILLS} kills, {len(missing)} missing")
    assert len(journaled) == total
    assert not missing
    assert set(written) == set(journaled), "nothing but journaled entries in the output"


def test_sigterm_finishes_in_flight_batches_and_exits_0(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, sources={"demo": {"type": "demo", "rate": 2000}},
        destinations={"out": {"type": "file", "path": str(output)}}))
    relay = RelayProcess(config, tmp_path / "relay.log")
    try:
        relay.start()
        wait_until_sync(lambda: output.exists() and output.stat().st_size > 0, 30, "first delivery")
        assert relay.terminate() == 0
    finally:
        relay.stop_quietly()
    events = [e["event"] for e in relay.events()]
    assert "relay_stopping" in events and events[-1] == "relay_stopped"
    with journal_db(tmp_path / "state") as db:
        pending = db.execute("SELECT count(*) FROM pending WHERE done = 0").fetchone()[0]
    assert pending == 0, "a graceful stop leaves no batch half-done"
    lines = output.read_bytes().splitlines()
    assert lines and len(lines) == len(set(lines))


def test_journal_is_usable_after_kill(tmp_path: Path) -> None:
    """Open the journal read-write after a kill: WAL recovery works and new writes go on."""
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, sources={"demo": {"type": "demo", "rate": 5000}},
        destinations={"out": {"type": "file", "path": str(tmp_path / "out.jsonl")}}))
    relay = RelayProcess(config, tmp_path / "relay.log")
    try:
        relay.start()
        time.sleep(0.5)  # let it write for a moment; the kill lands mid-flow
        relay.kill()
    finally:
        relay.stop_quietly()
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.execute("INSERT INTO quarantine (source, received_at, reason, data) VALUES ('t', 0, 'r', x'00')")
        db.commit()
    finally:
        db.close()
