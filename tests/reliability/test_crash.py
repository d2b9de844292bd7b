"""Crashes: `kill -9` the relay at random moments while a client pushes entries to its receiver and all four
destination types deliver them, restarting it each time.

Four clients retry every batch until it gets a 200, as a careful sender (WorkOS's log stream) does. After
each kill, before the restart, every entry acknowledged so far must be in the journal, and the journal
must pass SQLite's integrity check. At the end every acknowledged entry must be at every destination.
Duplicates are counted per destination and printed: none for S3 (an entry in two objects) and none at the
webhook receiver once it deduplicates by `webhook-id`; for Splunk HEC and syslog at most what was in
flight at each kill. Two of the kills land while the relay is still starting up (recovering).
"""

from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path

import pytest
import trio

from tests.helpers import RelayProcess, config_dict, free_port, journal_db, wait_until, write_config
from tests.moto_s3 import MotoS3
from tests.reliability.leaks import Leaks
from tests.reliability.peers import DESTINATIONS, missing_and_duplicates, open_peers, webhook_header_check
from tests.reliability.pusher import Pusher, numbered

PER_REQUEST = 100
CLIENTS = 4
"""Concurrent requests, so that kills also land between a request's arrival and its answer."""
BATCH = 200
"""batch.max_entries of every destination: the unit of what can be in flight, and so of duplicates."""
CONCURRENCY = {"hec": 4, "s3": 4, "webhook": 1, "syslog": 16}
STARTUP_KILLS = (3, 7)


def journal_check(state: Path) -> tuple[str, set[str]]:
    """(PRAGMA integrity_check, the ids of every journaled entry), read while the relay is down."""
    with journal_db(state) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        ids = {json.loads(row[0])["id"] for row in db.execute("SELECT data FROM entries")}
    return integrity, ids


@pytest.mark.parametrize(("total", "kills"), [
    pytest.param(20_000, 10, id="20k-entries-10-kills"),
    pytest.param(100_000, 30, id="100k-entries-30-kills", marks=pytest.mark.soak),
])
async def test_kill_9_at_random_moments_loses_no_acknowledged_entry_anywhere(
        tmp_path: Path, moto: MotoS3, leaks: Leaks, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str],
        total: int, kills: int) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    port = free_port()
    state = tmp_path / "state"
    async with open_peers(nursery, tmp_path, moto, leaks) as peers:
        destinations = peers.destinations(batch=BATCH, send_timeout="5s")
        for name, concurrency in CONCURRENCY.items():
            destinations[name]["concurrency"] = concurrency
        config = write_config(tmp_path / "relay.yaml", config_dict(
            tmp_path, {"push": {"type": "http", "listen": f"127.0.0.1:{port}",
                                "auth": {"bearer_tokens": ["${RECEIVER_TOKEN}"]}}},
            destinations, shutdown_timeout="10s"))
        relay = RelayProcess(config, leaks.file("relay log", tmp_path / "relay.log"), env=peers.env())
        pusher = Pusher(f"http://127.0.0.1:{port}/v1/entries", timeout=5.0)
        requests = [[numbered("crash", r * PER_REQUEST + i) for i in range(PER_REQUEST)]
                    for r in range(total // PER_REQUEST)]
        pace = CLIENTS * 25.0 * total / 20_000 / len(requests)
        """Spread the pushes over about as long as the kills take, so kills land while entries arrive."""

        def push_share(share: int) -> None:
            for request in requests[share::CLIENTS]:
                pusher.push_until_acked(request, deadline=180)
                time.sleep(pace)

        lost_at_kill: list[str] = []
        try:
            await trio.to_thread.run_sync(relay.start)
            async with trio.open_nursery() as client:
                for share in range(CLIENTS):
                    client.start_soon(functools.partial(trio.to_thread.run_sync, push_share, share))
                for kill in range(kills):
                    # Some kills land while the relay is still starting (recovering from the previous kill).
                    await trio.sleep(rng.uniform(0.05, 1.0) if kill in STARTUP_KILLS else rng.uniform(0.3, 2.5))
                    acked = pusher.acked_ids()
                    await trio.to_thread.run_sync(relay.kill)
                    integrity, journaled = await trio.to_thread.run_sync(journal_check, state)
                    assert integrity == "ok", f"journal damaged by kill {kill + 1}"
                    lost_at_kill += sorted(acked - journaled)
                    assert not lost_at_kill, f"kill {kill + 1}: acknowledged entries missing from the journal"
                    await trio.to_thread.run_sync(functools.partial(
                        relay.start, wait_ready=kill + 1 not in STARTUP_KILLS))
            expected = pusher.acked_ids()
            assert len(expected) == total

            def everywhere() -> bool:
                arrived = peers.arrived()
                return all(expected <= set(arrived[name]) for name in DESTINATIONS)

            await wait_until(lambda: relay.proc is not None and relay.proc.poll() is None, 5, "the relay running")
            deadline = trio.current_time() + 120
            while not await trio.to_thread.run_sync(everywhere):
                assert trio.current_time() < deadline, "not every acknowledged entry arrived everywhere in 120 s"
                await trio.sleep(0.5)  # peers in other processes: poll what they hold
            assert await trio.to_thread.run_sync(relay.terminate) == 0
        finally:
            pusher.stop.set()
            relay.stop_quietly()
            pusher.close()
        arrived = await trio.to_thread.run_sync(peers.arrived)
        resent_webhooks = peers.receiver.duplicates
        webhook_header_check(peers.receiver)
    outcome = missing_and_duplicates(arrived, expected)
    events = [e.get("event") for e in relay.events()]
    with capsys.disabled():
        print(f"\ncrash test (seed {seed}): {total} entries pushed, {kills} kills, client answers "
              f"{dict(pusher.answers)}, {events.count('batch_resumed')} batches resumed after restarts")
        for name in DESTINATIONS:
            missing, duplicates = outcome[name]
            print(f"  {name:<8} {len(arrived[name]):>6} distinct entries, {missing} missing, {duplicates} duplicates"
                  + (f" (receiver saw {resent_webhooks} repeated webhook-ids and dropped them)"
                     if name == "webhook" else ""))
    for name in DESTINATIONS:
        assert outcome[name][0] == 0, f"{name} is missing acknowledged entries"
        assert set(arrived[name]) == expected, f"{name} holds entries that were never acknowledged"
    assert outcome["s3"][1] == 0, "an entry is in two S3 objects"
    assert outcome["webhook"][1] == 0, "the webhook receiver processed an entry twice"
    for name in ("hec", "syslog"):
        bound = kills * CONCURRENCY[name] * BATCH
        assert outcome[name][1] <= bound, f"{name}: more duplicates than batches in flight at the kills"
