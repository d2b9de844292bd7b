"""The journal: dedupe, cursors committed with entries, quarantine, group commit, pruning, back-pressure."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import trio

import relay
from relay.intake import JournalIntake
from relay.journal import Journal
from tests import scripted
from tests.helpers import config_dict, entry, journal_db, make_config, running_relay
from tests.journal_harness import open_journal


async def test_same_entry_twice_is_journaled_once(tmp_path: Path) -> None:
    async with open_journal(tmp_path) as journal:
        intake = JournalIntake("push", journal, None)
        first = await intake.submit([entry(), entry(), entry("user.created")])
        again = await intake.submit([entry("user.created"), entry("user.deactivated")])
    assert (first.accepted, first.duplicates) == (2, 1)
    assert (again.accepted, again.duplicates) == (1, 1)
    with journal_db(tmp_path) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 3


async def test_entries_with_an_id_dedupe_by_id(tmp_path: Path) -> None:
    async with open_journal(tmp_path) as journal:
        intake = JournalIntake("push", journal, None)
        await intake.submit([entry(id="evt_1")])
        result = await intake.submit([entry(id="evt_1", occurred_at="2025-01-01T00:00:00Z"), entry(id="evt_2")])
    assert (result.accepted, result.duplicates) == (1, 1)


async def test_cursor_is_committed_with_the_entries(tmp_path: Path) -> None:
    async with open_journal(tmp_path) as journal:
        intake = JournalIntake("poller", journal, await journal.load_cursor("poller"))
        assert intake.cursor is None
        await intake.submit([entry()], cursor="page-2")
        await intake.submit([entry("user.created")])  # cursor unchanged
    async with open_journal(tmp_path) as journal:
        assert await journal.load_cursor("poller") == "page-2"


async def test_invalid_entries_are_quarantined_with_the_field_and_the_rest_accepted(tmp_path: Path) -> None:
    bad = [
        {"occurred_at": "2024-05-14T09:30:00Z", "actor": {"type": "user", "id": "u"}},
        entry(occurred_at="yesterday"),
        entry(actor={"type": "user"}),
        entry(version="1"),
        entry(targets={"type": "user"}),
        "not an object",
    ]
    async with open_journal(tmp_path) as journal:
        result = await JournalIntake("push", journal, None).submit([entry(), *bad])
    assert (result.accepted, result.quarantined) == (1, 6)
    reasons = dict(result.problems)
    assert reasons[1] == "entry 1: action: missing"
    assert reasons[2].startswith("entry 2: occurred_at: 'yesterday' is not an RFC 3339 timestamp")
    assert reasons[3] == "entry 3: actor.id: missing"
    assert reasons[4] == "entry 4: version: must be an integer, not a string"
    assert reasons[5] == "entry 5: targets: must be an array, not an object"
    assert reasons[6] == "entry 6: an entry must be a JSON object, not a string"
    with journal_db(tmp_path) as db:
        rows = db.execute("SELECT source, reason, data FROM quarantine ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["push"] * 6
    assert rows[5][2] == b'"not an object"', "the input itself is kept"


async def test_values_json_cannot_hold_are_quarantined_not_altered_or_raised(tmp_path: Path) -> None:
    """A source plugin hands over Python values: NaN would be written as null, and a value nested 10,000
    deep made quarantining it raise RecursionError out of submit()."""
    deep: dict[str, object] = {}
    level = deep
    for _ in range(10_000):
        level["x"] = level = {}
    items = [entry(context={"score": float("nan")}), entry(context={"tree": deep}), deep, entry(context={1: b"\xff"})]
    async with open_journal(tmp_path) as journal:
        result = await JournalIntake("plugin", journal, None).submit(items)
    assert (result.accepted, result.quarantined) == (0, 4)
    reasons = dict(result.problems)
    assert reasons[0] == "entry 0: context.score: NaN and Infinity cannot be represented as JSON"
    assert reasons[1] == "entry 1: cannot be represented as JSON: Recursion limit reached"
    assert reasons[2] == "entry 2: action: missing"
    assert reasons[3] == "entry 3: cannot be represented as JSON: Dict key must be str"
    with journal_db(tmp_path) as db:
        kept = [r[0] for r in db.execute("SELECT data FROM quarantine ORDER BY id")]
    assert kept[0].startswith(b'{"action":"api_key.created"') and b'"score":null' in kept[0]
    assert kept[1].startswith(b"{'action': 'api_key.created'") and len(kept[1]) < 100_000
    assert b'"1":"b' in kept[3], "keys and bytes JSON cannot hold are kept as text"


async def test_unknown_actions_and_fields_pass_through_unchanged(tmp_path: Path) -> None:
    future = entry("quantum_router.teleported", version=7, actor={"type": "robot", "id": "r1"}, hologram={"x": 1})
    async with open_journal(tmp_path) as journal:
        result = await JournalIntake("push", journal, None).submit([future])
    assert result.accepted == 1
    with journal_db(tmp_path) as db:
        (data,) = db.execute("SELECT data FROM entries").fetchone()
    assert relay.Entry(1, data, 0, "").value() == future


async def test_concurrent_submits_share_commits_and_all_land(tmp_path: Path) -> None:
    async with open_journal(tmp_path) as journal:
        intake = JournalIntake("push", journal, None)
        results = []

        async def push(i: int) -> None:
            results.append(await intake.submit(
                [entry(occurred_at=f"2024-05-14T09:{i % 60:02d}:{j:02d}.{i:06d}Z") for j in range(20)]))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(push, i)
    assert sum(r.accepted for r in results) == 1000
    assert journal.last_seq == 1000


async def test_delivered_entries_are_pruned_after_retention_undelivered_never(tmp_path: Path,
                                                                           script: scripted.Script) -> None:
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}},
                                     {"out": {"type": "scripted", "script": "main"}}, journal={"retention": 0}),
                         extra=[scripted])
    script.answers = [relay.Delivered(), relay.Halted("stop here")] + [relay.Halted("stop here")] * 100
    async with running_relay(config) as service:
        intake = service.sources["in"].intake
        await intake.submit([entry(occurred_at=f"2024-05-14T09:30:{i:02d}Z") for i in range(10)])
        loop = service.destinations["out"].loop
        with trio.fail_after(30):
            await loop.wait_offset(10)
        await intake.submit([entry(occurred_at=f"2024-05-14T10:30:{i:02d}Z") for i in range(5)])
        with trio.fail_after(30):
            await loop.wait_state("halted")
        deleted = await service.journal.write(service.journal._prune_chunk)
    assert deleted == 10
    with journal_db(tmp_path / "state") as db:
        assert [r[0] for r in db.execute("SELECT seq FROM entries ORDER BY seq")] == [11, 12, 13, 14, 15]


async def test_full_journal_pauses_sources_until_delivery_frees_space(tmp_path: Path,
                                                                     script: scripted.Script) -> None:
    """Journal full -> sources pause (nothing dropped) -> delivery frees space -> sources resume."""
    script.gate = trio.Event()
    config = make_config(config_dict(
        tmp_path, {"demo": {"type": "demo", "rate": 20000, "count": 6000}},
        {"out": {"type": "scripted", "script": "main", "batch": {"max_entries": 500}}},
        journal={"max_size": "1MiB", "retention": 0}), extra=[scripted])
    async with running_relay(config) as service:
        journal = service.journal
        with trio.fail_after(30):
            while not journal.statistics().full:  # noqa: ASYNC110 - the demo source fills it at its own pace
                await trio.sleep(0.01)
        assert not service.sources["demo"].intake.writable
        with pytest.raises(relay.JournalUnavailable, match="full"):
            await service.sources["demo"].intake.submit([entry()])
        held = journal.last_seq
        assert held < 6000, "the demo source paused before producing everything"
        script.gate.set()
        with trio.fail_after(60):
            await service.destinations["out"].loop.wait_offset(6000)
    assert sorted(e.seq for e in script.delivered) == list(range(1, 6001))
    with journal_db(tmp_path / "state") as db:
        assert db.execute("SELECT cursor FROM sources WHERE name = 'demo'").fetchone()[0] == "6000"


def fill_disk(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make every group commit fail as SQLite does on a full disk; returns what gives the space back."""
    run_group = journal._run_group
    full = sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(journal, "_run_group", lambda ops: journal._fail_all(ops, full))
    return lambda: monkeypatch.setattr(journal, "_run_group", run_group)


async def test_a_full_disk_refuses_intake_and_holds_bookkeeping_until_space_returns(
        tmp_path: Path, script: scripted.Script, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLITE_FULL while a batch is in flight: its outcome waits to be recorded (the relay stays up), intake
    is refused with the reason, and everything goes on once space returns. Here SQLite's error is injected
    at the group commit; tests/reliability/test_disk_full.py fills a real filesystem."""
    script.gate = trio.Event()
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}},
                                     {"out": {"type": "scripted", "script": "main"}}), extra=[scripted])
    async with running_relay(config) as service:
        journal, intake, loop = service.journal, service.sources["in"].intake, service.destinations["out"].loop
        await intake.submit([entry(id=f"evt_{i}") for i in range(5)])
        await script.wait(lambda s: s.attempts == 1)
        space_returns = fill_disk(journal, monkeypatch)
        with pytest.raises(relay.JournalUnavailable, match="disk is full"):
            await intake.submit([entry(id="evt_refused")])
        assert not intake.writable
        script.gate.set()
        await script.wait(lambda s: len(s.delivered) == 5)
        with trio.move_on_after(1.5):  # the outcome is retried while the disk stays full
            await loop.wait_offset(5)
        assert loop.offset == 0 and journal.running, "waiting for space, not crashed"
        space_returns()
        with trio.fail_after(10):
            await loop.wait_offset(5)
            await journal.wait_writable()
        assert (await intake.submit([entry(id="evt_after")])).accepted == 1
        with trio.fail_after(10):
            await loop.wait_offset(6)


async def test_a_full_disk_does_not_hold_back_retries_of_batches_in_flight(
        tmp_path: Path, script: scripted.Script, monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination's state ("retrying") is written for `relay status`; with the disk full that write
    must not make the batch wait: it is retried, and sent, while the disk stays full, and the state is
    written at the first retry after space returns. (CI once filled the disk right after the first failed
    uploads: the state write waited for space and the uploads stopped.)"""
    script.gate = trio.Event()
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}},
                                     {"out": {"type": "scripted", "script": "main",
                                              "retry": {"initial_backoff": "10ms", "max_backoff": "10ms"}}}),
                         extra=[scripted])
    busy = relay.RetryLater("busy")
    async with running_relay(config) as service:
        journal, intake, loop = service.journal, service.sources["in"].intake, service.destinations["out"].loop
        await intake.submit([entry(id=f"evt_{i}") for i in range(5)])
        await script.wait(lambda s: s.attempts == 1)
        space_returns = fill_disk(journal, monkeypatch)
        script.answers = [busy] * 10**6
        script.gate.set()
        with trio.fail_after(10):
            await script.wait(lambda s: s.attempts >= 6)
        assert loop.state == "retrying" and not journal.writable
        with journal_db(tmp_path / "state") as db:
            assert db.execute("SELECT state FROM destinations").fetchone()[0] == "up", "not written yet"
        space_returns()
        with trio.fail_after(10):
            await loop.wait_state("retrying")
        with journal_db(tmp_path / "state") as db:
            assert db.execute("SELECT state, state_reason FROM destinations").fetchone() == ("retrying", "busy")
        script.answers = []
        with trio.fail_after(10):
            await loop.wait_offset(5)
            await loop.wait_state("up")
    assert len(script.delivered) == 5


async def test_a_full_journal_at_start_prunes_nothing_undelivered(tmp_path: Path) -> None:
    """Restarting with a full journal wakes the pruner at once; before the service has said which
    destinations exist, it must not treat the journal as having none (that would delete everything)."""
    async with open_journal(tmp_path, retention=0) as journal:
        await JournalIntake("push", journal, None).submit(
            [entry(occurred_at=f"2024-05-14T09:30:{i:02d}Z") for i in range(50)])
        await journal.register_destination("out", "oldest")
    async with open_journal(tmp_path, max_size=4096, retention=0) as journal:
        assert journal.statistics().full
        assert await journal.write(journal._prune_chunk) == 0
    with journal_db(tmp_path) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 50


async def test_entries_sharing_a_key_are_all_kept_and_still_deduplicated(tmp_path: Path) -> None:
    """The dedupe index holds 64 bits; different entries sharing them are all kept, each under the next
    free key of its probe sequence, where its own copies find it. Past 16, one is kept without a key."""
    from relay.entry import prepare

    first = prepare(entry())
    clashes = [prepare(entry(f"user.created.{i}"))._replace(key=first.key) for i in range(16)]
    async with open_journal(tmp_path) as journal:
        assert await journal.append("push", [first], (), None, keep_cursor=True) == 1
        assert await journal.append("push", [clashes[0], first], (), None, keep_cursor=True) == 1
        assert await journal.append("push", [clashes[0], first], (), None, keep_cursor=True) == 0, "copies"
        assert await journal.append("push", clashes, (), None, keep_cursor=True) == 15
    with journal_db(tmp_path) as db:
        rows = db.execute("SELECT key, action FROM entries ORDER BY seq").fetchall()
    assert rows == [(first.key, "api_key.created"), *((first.key ^ i, f"user.created.{i - 1}") for i in range(1, 16)),
                    (None, "user.created.15")]


async def test_a_copy_is_found_past_a_pruned_entry_of_its_probe_sequence(tmp_path: Path) -> None:
    from relay.entry import prepare

    first = prepare(entry())
    second, third = (prepare(entry(f"user.created.{i}"))._replace(key=first.key) for i in range(2))
    async with open_journal(tmp_path) as journal:
        assert await journal.append("push", [first, second, third], (), None, keep_cursor=True) == 3
        await journal.write(lambda db: db.execute("DELETE FROM entries WHERE key = ?", (first.key ^ 1,)))
        assert await journal.append("push", [third, first], (), None, keep_cursor=True) == 0


async def test_numbers_beyond_64_bits_are_quarantined_not_rounded(tmp_path: Path) -> None:
    """orjson would turn 2**64 into a float without a word; the entry must not change silently."""
    from relay.entry import loads

    raw = orjson.dumps(entry())[:-1] + b',"metadata":{"count":18446744073709551616}}'
    async with open_journal(tmp_path) as journal:
        result = await JournalIntake("push", journal, None).submit([loads(raw)])
    assert (result.accepted, result.quarantined) == (0, 1)
    assert "64-bit" in result.problems[0][1]


def test_a_20_digit_number_nested_too_deeply_for_the_exact_parser_is_invalid_json() -> None:
    """orjson reads 1,000 levels of nesting; the stdlib parser that keeps such numbers exact runs out of
    recursion there. That is input we cannot read exactly, refused as invalid JSON (found by the
    bad-input test, which got a 500 from the push receiver)."""
    from relay.entry import loads

    raw = b"[" * 1000 + b"10000000000000000000" + b"]" * 1000
    with pytest.raises(orjson.JSONDecodeError, match="nested too deeply"):
        loads(raw)
