"""Reloading the configuration: the plan, applying it under load with nothing lost or duplicated, invalid
configurations, removed destinations, and `relay reload` against a real process."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from relay import reload as reloading
from relay.journal import REMOVED_KEEP, _forget_removed
from relay.journal_schema import JOURNAL_FILE
from relay.pidfile import PID_FILE
from tests import feeding, scripted
from tests.feeding import FEEDS, Feed, entry_ids
from tests.helpers import (
    ROOT,
    RelayProcess,
    config_dict,
    destination_row,
    entry,
    free_ports,
    make_config,
    running_relay,
    wait_until_sync,
    write_config,
)

EXTRA = [scripted, feeding]


@pytest.fixture(autouse=True)
def _clean() -> Any:
    yield
    FEEDS.clear()
    for name in list(scripted.SCRIPTS):
        if name != "main":
            scripted.SCRIPTS.pop(name)


def _config(tmp_path: Path, sources: dict[str, Any], destinations: dict[str, Any], **top: Any) -> Any:
    return make_config(config_dict(tmp_path, sources, destinations, **top), extra=EXTRA)


def test_plan_compares_settings_by_value(tmp_path: Path) -> None:
    old = _config(tmp_path, {"in": {"type": "manual"}, "feed": {"type": "feed", "feed": "x"}},
                  {"a": {"type": "scripted", "script": "a"}, "b": {"type": "scripted", "script": "b"}})
    new = _config(tmp_path, {"in": {"type": "manual"}, "feed": {"type": "feed", "feed": "x", "variant": 1}},
                  {"a": {"type": "scripted", "script": "a"}, "c": {"type": "scripted", "script": "c"}},
                  journal={"max_size": "10MiB"}, shutdown_timeout="5s")
    plan = reloading.plan(old, new)
    assert plan.sources == reloading.Changes(changed=("feed",))
    assert plan.destinations == reloading.Changes(added=("c",), removed=("b",))
    assert plan.restart_required == ("journal.max_size",)
    assert plan.live == ("shutdown_timeout",)
    assert not reloading.plan(old, _config(tmp_path, {"in": {"type": "manual"}, "feed": {"type": "feed", "feed": "x"}},
                                           {"a": {"type": "scripted", "script": "a"},
                                            "b": {"type": "scripted", "script": "b"}}))
    running = reloading.effective(old, new)
    assert running.journal == old.journal and running.destinations == new.destinations


async def test_reload_under_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    main = FEEDS["main"] = Feed(limit=1500)
    side = FEEDS["side"] = Feed(limit=300, pace=0.01)
    a = scripted.SCRIPTS["a"] = scripted.Script()
    b = scripted.SCRIPTS["b"] = scripted.Script()
    sources = {"main": {"type": "feed", "feed": "main"}, "side": {"type": "feed", "feed": "side"}}
    dest_a = {"type": "scripted", "script": "a"}
    dest_b = {"type": "scripted", "script": "b", "start_at": "oldest"}
    changed_a = {**dest_a, "batch": {"max_entries": 7}}
    changed_main = {**sources, "main": {"type": "feed", "feed": "main", "variant": 1}}
    steps: list[tuple[str, Any]] = [
        ("add b", _config(tmp_path, sources, {"a": dest_a, "b": dest_b})),
        ("change a", _config(tmp_path, sources, {"a": changed_a, "b": dest_b})),
        ("change source main", _config(tmp_path, changed_main, {"a": changed_a, "b": dest_b})),
        ("remove b", _config(tmp_path, changed_main, {"a": changed_a})),
        ("invalid", None),
        ("add b again", _config(tmp_path, changed_main, {"a": changed_a, "b": dest_b})),
    ]
    bad = config_dict(tmp_path, changed_main, {"a": {**changed_a, "batch": {"max_entries": 0}}})
    outcomes = []
    async with running_relay(_config(tmp_path, sources, {"a": dest_a})) as service:
        side_source = service.sources["side"].source
        service.loader = lambda: make_config(bad, extra=EXTRA)
        with trio.fail_after(60):
            for number, (what, config) in enumerate(steps, start=1):
                await main.wait(lambda f, n=number: f.produced >= n * f.limit // (len(steps) + 1))
                outcome = await service.reload(config)
                outcomes.append((what, outcome.result))
                if what == "remove b":
                    assert destination_row(tmp_path / "state", "b")["removed_at"] is not None
                    assert service.journal.active_destinations == {"a"}, "a removed destination holds nothing back"
            await main.wait(lambda f: f.produced == f.limit)
            await side.wait(lambda f: f.produced == f.limit)
            last = service.journal.last_seq
            await service.destinations["a"].loop.wait_offset(last)
            await service.destinations["b"].loop.wait_offset(last)
        assert service.sources["side"].source is side_source, "an unchanged source is not touched"
        assert service.config.destinations["a"].batch.max_entries == 7

    assert outcomes == [("add b", "applied"), ("change a", "applied"), ("change source main", "applied"),
                        ("remove b", "applied"), ("invalid", "rejected"), ("add b again", "applied")]
    assert (main.instances, side.instances) == (2, 1)
    expected = Counter([f"main-{i:06d}" for i in range(main.limit)] + [f"side-{i:06d}" for i in range(side.limit)])
    for script in (a, b):
        received = Counter(entry_ids(script.delivered))
        assert received - expected == Counter(), "duplicated or unexpected"
        assert expected - received == Counter(), "lost"
    assert {len(batch) for batch in a.batches[-5:]} <= set(range(1, 8)), "the changed batch size applies"


async def test_invalid_config_keeps_the_old_one_and_says_why(tmp_path: Path, script: scripted.Script) -> None:
    data = config_dict(tmp_path, {"in": {"type": "manual"}}, {"out": {"type": "scripted", "script": "main"}})
    bad = config_dict(tmp_path, {"in": {"type": "manual"}},
                      {"out": {"type": "scripted", "script": "main", "batch": {"max_entrie": 3}},
                       "new": {"type": "nope"}})
    async with running_relay(make_config(data, extra=EXTRA)) as service:
        before = service.config
        loop = service.destinations["out"].loop
        service.loader = lambda: make_config(bad, extra=EXTRA)
        with capture_logs() as logs:
            outcome = await service.reload()
        assert service.config is before and service.destinations["out"].loop is loop
        await service.sources["in"].intake.submit([entry()])
        with trio.fail_after(5):
            await loop.wait_offset(1)
    assert outcome.result == "rejected"
    assert any("destinations.out.batch.max_entrie: unknown key (did you mean 'max_entries'?)" in p
               for p in outcome.problems)
    assert any("destinations.new.type: unknown destination type 'nope'" in p for p in outcome.problems)
    assert len(outcome.problems) == 2
    assert [e["problem"] for e in logs if e["event"] == "reload_problem"] == outcome.problems
    assert [e["event"] for e in logs if e["log_level"] == "error"][-1] == "reload_rejected"
    written = reloading.read_outcome(tmp_path / "state")
    assert written is not None and written.result == "rejected" and written.problems == outcome.problems


async def test_changed_destination_resumes_its_batch_in_flight(tmp_path: Path, script: scripted.Script) -> None:
    """A batch cut off by the restart of its loop is rebuilt from its recorded boundaries, like after a crash."""
    script.gate = trio.Event()
    dest = {"type": "scripted", "script": "main"}
    config = _config(tmp_path, {"in": {"type": "manual"}}, {"out": dest}, shutdown_timeout="200ms")
    changed = _config(tmp_path, {"in": {"type": "manual"}}, {"out": {**dest, "send_timeout": "30s"}},
                      shutdown_timeout="200ms")
    async with running_relay(config) as service:
        await service.sources["in"].intake.submit([entry(id="e1"), entry(id="e2"), entry(id="e3")])
        with trio.fail_after(10):
            await script.wait(lambda s: s.attempts == 1)
            outcome = await service.reload(changed)
            await script.wait(lambda s: s.attempts == 2)
            assert service.destinations["out"].config is changed.destinations["out"]
            script.gate.set()
            await service.destinations["out"].loop.wait_offset(3)
    assert outcome.result == "applied"
    assert entry_ids(script.delivered) == ["e1", "e2", "e3"]
    (batch,) = script.batches
    assert (batch.first_seq, batch.last_seq) == (1, 3)


async def test_a_source_that_cannot_start_after_a_reload_does_not_stop_the_relay(tmp_path: Path,
                                                                                  script: scripted.Script) -> None:
    FEEDS["f"] = Feed(limit=10)
    dest = {"out": {"type": "scripted", "script": "main"}}
    async with running_relay(_config(tmp_path, {"in": {"type": "manual"}}, dest)) as service:
        outcome = await service.reload(_config(tmp_path, {"in": {"type": "manual"}, "f": {
            "type": "feed", "feed": "f", "fail_open": "cannot bind 127.0.0.1:9: address in use"}}, dest))
        assert service._readiness() == (False, "sources not running: f")
        await service.sources["in"].intake.submit([entry()])
        with trio.fail_after(5):
            await service.destinations["out"].loop.wait_offset(1)
    assert outcome.result == "partial"
    assert outcome.problems == ["source f: OSError: cannot bind 127.0.0.1:9: address in use; retrying with backoff"]


async def test_removed_destination_is_forgotten_after_7_days_and_warns_of_a_gap_if_it_returns(
        tmp_path: Path) -> None:
    scripted.SCRIPTS["a"], scripted.SCRIPTS["b"] = scripted.Script(), scripted.Script()
    both = {"a": {"type": "scripted", "script": "a"}, "b": {"type": "scripted", "script": "b"}}
    only_a = {"a": both["a"]}
    state = tmp_path / "state"
    async with running_relay(_config(tmp_path, {"in": {"type": "manual"}}, both, journal={"retention": "0s"})
                             ) as service:
        await service.sources["in"].intake.submit([entry(id="1")])
        with trio.fail_after(5):
            await service.destinations["b"].loop.wait_offset(1)
        await service.reload(_config(tmp_path, {"in": {"type": "manual"}}, only_a, journal={"retention": "0s"}))
        await service.sources["in"].intake.submit([entry(id="2"), entry(id="3")])
        with trio.fail_after(5):
            await service.destinations["a"].loop.wait_offset(3)
            while service.journal.statistics().last_seq and await service.journal.write(service.journal._prune_chunk):
                pass  # prune now rather than in 10 s: b does not hold it back
        with capture_logs() as logs:
            await service.reload(_config(tmp_path, {"in": {"type": "manual"}}, both, journal={"retention": "0s"}))
    (gap,) = [e for e in logs if e["event"] == "destination_gap"]
    assert (gap["destination"], gap["first_seq"], gap["last_seq"], gap["entries"]) == ("b", 2, 3, 2)

    db = sqlite3.connect(state / JOURNAL_FILE)  # b removed 8 days ago, a an hour ago: b is forgotten
    try:
        db.execute("UPDATE destinations SET removed_at = ? WHERE name = 'b'", (time.time() - REMOVED_KEEP - 86400,))
        db.execute("UPDATE destinations SET removed_at = ? WHERE name = 'a'", (time.time() - 3600,))
        _forget_removed(db)
        db.commit()
        assert [r[0] for r in db.execute("SELECT name FROM destinations")] == ["a"]
    finally:
        db.close()


def _relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_relay_reload_signals_the_running_process_and_reports_the_outcome(tmp_path: Path) -> None:
    out1, out2 = tmp_path / "out1.jsonl", tmp_path / "out2.jsonl"
    sources = {"demo": {"type": "demo", "rate": 200}}
    first = {"out1": {"type": "file", "path": str(out1)}}
    config = write_config(tmp_path / "relay.yaml", config_dict(tmp_path, sources, first))
    relay = RelayProcess(config, tmp_path / "relay.log")
    second = RelayProcess(config, tmp_path / "second.log")
    try:
        relay.start()
        assert (tmp_path / "state" / PID_FILE).read_text().split()[0] == str(relay.proc.pid)  # type: ignore[union-attr]
        second.start(wait_ready=False)
        assert second.proc is not None and second.proc.wait(timeout=30) == 1
        assert f"another process (pid {relay.proc.pid}: relay run) is using" in second.log_text()  # type: ignore[union-attr]

        write_config(config, config_dict(tmp_path, sources, {**first, "out2": {"type": "file", "path": str(out2)}}))
        result = _relay_cli("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert "reload applied: destinations added: out2" in result.stdout
        wait_until_sync(lambda: out2.exists() and out2.stat().st_size > 0, 30, "entries in the new destination")

        write_config(config, f"state_dir: {tmp_path / 'state'}\nsources:\n  demo:\n    type: demo\n    rat: 5\n")
        result = _relay_cli("reload", "--config", str(config))
        assert result.returncode == 2
        assert "reload rejected: the relay keeps running on its previous configuration (1 problem)" in result.stderr
        assert "relay.yaml:5: sources.demo.rat: unknown key (did you mean 'rate'?)" in result.stderr
        assert relay.proc is not None and relay.proc.poll() is None
        assert any(e.get("event") == "reload_problem" for e in relay.events())
        assert relay.terminate() == 0
    finally:
        relay.stop_quietly()
        second.stop_quietly()
    assert not (tmp_path / "state" / PID_FILE).exists(), "removed at a clean exit"
    result = _relay_cli("reload", "--config", str(config))
    assert result.returncode == 1 and "no relay is running" in result.stderr



async def test_metrics_endpoint_moves_to_its_new_address(tmp_path: Path, script: scripted.Script) -> None:
    first, second = free_ports(2)
    src, dest = {"in": {"type": "manual"}}, {"out": {"type": "scripted", "script": "main"}}
    async with running_relay(_config(tmp_path, src, dest, metrics={"listen": f"127.0.0.1:{first}"})) as service, \
            httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{first}/readyz")).status_code == 200
        outcome = await service.reload(_config(tmp_path, src, dest, metrics={"listen": f"127.0.0.1:{second}"}))
        assert outcome.changes == {"settings": {"changed": ["metrics.listen"]}}
        assert (await client.get(f"http://127.0.0.1:{second}/readyz")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{first}/readyz")
        assert service.endpoint_addresses == [f"http://127.0.0.1:{second}"]


async def test_a_component_that_fails_to_start_keeps_its_previous_settings(tmp_path: Path,
                                                                           script: scripted.Script) -> None:
    """The destination runs on with its previous settings, and the next reload tries the new ones again."""
    src = {"in": {"type": "manual"}}
    good = {"out": {"type": "fragile", "script": "main"}}
    broken = {"out": {"type": "fragile", "script": "main", "broken": True}}
    async with running_relay(_config(tmp_path, src, good)) as service:
        outcome = await service.reload(_config(tmp_path, src, broken))
        assert outcome.result == "partial"
        assert outcome.problems == ["destination out: RuntimeError: cannot build this destination"]
        await service.sources["in"].intake.submit([entry(id="1")])
        with trio.fail_after(5):
            await service.destinations["out"].loop.wait_offset(1)
        assert service.config.destinations["out"].settings.broken is False, "what actually runs"
        again = await service.reload(_config(tmp_path, src, broken))
        assert again.result == "partial" and again.changes == {"destinations": {"changed": ["out"]}}
    assert entry_ids(script.delivered) == ["1"]
