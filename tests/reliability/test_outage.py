"""Outages: each destination in turn is down three ways while entries keep flowing, then comes back.

The ways: connections refused (nothing listens), busy (HTTP 503; for syslog, every connection reset) and
hanging (requests taken and never answered; for syslog, the receiver frozen with SIGSTOP so its socket
buffer fills up). Each state lasts until the destination has failed at least twice in it and every other
destination has delivered more meanwhile: that is the proof that one destination's outage holds up no
other. At the end every journaled entry is at every destination: no loss, the backlog drained, S3 with no
entry in two objects and the webhook receiver with no entry twice after deduplicating by webhook-id.
"""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from tests import feeding
from tests.helpers import config_dict, journal_entries, make_config, metric_value, running_relay, wait_until
from tests.moto_s3 import MotoS3
from tests.reliability.leaks import Leaks
from tests.reliability.peers import DESTINATIONS, missing_and_duplicates, open_peers, webhook_header_check

STATES = ("refused", "busy", "hanging")
PROGRESS = 50
"""Entries each other destination must deliver while one is in an outage state."""


def failures(name: str) -> float:
    return metric_value("audit_relay_destination_retries_total", destination=name, outcome="retry")


async def test_each_destination_down_three_ways_loses_nothing_and_holds_up_no_other(
        tmp_path: Path, moto: MotoS3, leaks: Leaks, nursery: trio.Nursery) -> None:
    feeding.FEEDS["outage"] = feed = feeding.Feed(limit=10**9, pace=0.02)
    async with open_peers(nursery, tmp_path, moto, leaks) as peers:
        data = config_dict(tmp_path, {"feed": {"type": "feed", "feed": "outage", "per_submit": 10}},
                           peers.destinations(batch=100), shutdown_timeout="5s")
        config = make_config(data, extra=[feeding], env=peers.env())
        progress: dict[str, dict[str, int]] = {}
        async with running_relay(config) as service:
            loops = {name: service.destinations[name].loop for name in DESTINATIONS}
            for name in DESTINATIONS:
                others = [n for n in DESTINATIONS if n != name]
                for state in STATES:
                    await peers.down(name, state)
                    failed, start = failures(name), {n: loops[n].offset for n in others}

                    def held(name: str = name, failed: float = failed, start: dict[str, int] = start) -> bool:
                        return failures(name) >= failed + 2 and all(
                            loops[n].offset >= start[n] + PROGRESS for n in start)

                    await wait_until(held, 60, f"{name} {state}: two failed attempts while the others deliver")
                    progress[f"{name} {state}"] = {n: loops[n].offset - start[n] for n in others}
                await peers.up(name)
                head = service.journal.last_seq
                await wait_until(lambda name=name, head=head: loops[name].offset >= head, 60,  # type: ignore[misc]
                                 f"{name}'s backlog to drain")
            feed.limit = feed.produced  # the source stops at its next submit
            await feed.wait(lambda f: f.produced >= f.limit)
            last = service.journal.last_seq
            await wait_until(lambda: all(loop.offset >= last for loop in loops.values()), 60, "every destination")
        arrived = await trio.to_thread.run_sync(peers.arrived)
        expected = {feeding.feed_entry("outage", i)["id"] for i in range(feed.produced)}
        journaled = await trio.to_thread.run_sync(functools.partial(journal_entries, config.state_dir))
    print("\noutage: entries delivered by the other destinations during each state:")
    for phase, moved in progress.items():
        print(f"  {phase:<18} " + "  ".join(f"{n}+{count}" for n, count in moved.items()))
    outcome = missing_and_duplicates(arrived, expected)
    print("outage: per destination (missing, duplicates): " + ", ".join(f"{n} {v}" for n, v in outcome.items()))
    assert len(journaled) == len(expected) == feed.produced
    for name, (missing, _) in outcome.items():
        assert missing == 0, f"{name} lost {missing} entries"
        assert set(arrived[name]) == expected, f"{name} received entries that were never journaled"
    assert outcome["s3"][1] == 0, "an entry is in two S3 objects"
    assert outcome["webhook"][1] == 0, "the webhook receiver processed an entry twice despite webhook-id"
    webhook_header_check(peers.receiver)
