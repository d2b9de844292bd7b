"""The built-in demo source and file/stdout destinations."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
import trio

import relay
from relay.context import Context
from relay.entry import prepare
from relay_plugins.demo import DemoSource
from relay_plugins.file import FileDestination, FileSettings
from tests.helpers import entry


async def test_demo_entries_are_valid_and_varied(tmp_path: Path) -> None:
    source = DemoSource(Context("demo", "source", tmp_path), DemoSource.Settings())
    await source.open()
    rng = random.Random(7)
    entries = [source.make_entry(rng) for _ in range(3000)]
    prepared = [prepare(e) for e in entries]  # raises if any is invalid
    assert Counter(p.unrecognized for p in prepared) == Counter({(): 3000}), "only documented types"
    assert {e["actor"]["type"] for e in entries} == {"user", "api_key", "system", "workflow",
                                                     "external_resource", "alert"}
    assert {e["version"] for e in entries} == {1, 2}
    assert len({e["action"] for e in entries}) > 150
    assert len({p.key for p in prepared}) == 3000, "no two demo entries are the same entry"


def _batch(*values: dict[str, object]) -> relay.Batch:
    entries = [relay.Entry(i + 1, prepare(v).data, 0.0, str(v["action"])) for i, v in enumerate(values)]
    return relay.Batch("out", 1, len(entries), entries)


async def test_file_appends_lines_and_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    dest = FileDestination(Context("out", "destination", tmp_path), FileSettings(path=path))
    await dest.open()
    assert await dest.send(_batch(entry(), entry("user.created"))) == relay.Delivered()
    path.rename(tmp_path / "logs" / "audit.jsonl.1")
    assert await dest.send(_batch(entry("user.deactivated"))) == relay.Delivered()
    await dest.close()
    assert len((tmp_path / "logs" / "audit.jsonl.1").read_bytes().splitlines()) == 2
    assert b'"action":"user.deactivated"' in path.read_bytes()


async def test_file_removes_a_line_cut_short_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"complete":1}\n{"cut sho')
    dest = FileDestination(Context("out", "destination", tmp_path), FileSettings(path=path))
    await dest.open()
    await dest.close()
    assert path.read_bytes() == b'{"complete":1}\n'


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
async def test_file_permission_denied_halts(tmp_path: Path) -> None:  # pragma: no cover - root in CI
    path = tmp_path / "ro" / "audit.jsonl"
    path.parent.mkdir()
    path.parent.chmod(0o500)
    dest = FileDestination(Context("out", "destination", tmp_path), FileSettings(path=path))
    result = await dest.send(_batch(entry()))
    assert isinstance(result, relay.Halted)


async def test_file_into_a_directory_halts_with_the_reason(tmp_path: Path) -> None:
    dest = FileDestination(Context("out", "destination", tmp_path), FileSettings(path=tmp_path))
    result = await dest.send(_batch(entry()))
    assert isinstance(result, relay.Halted)
    assert str(tmp_path) in result.reason and "directory" in result.reason.lower()


async def test_demo_source_honours_count_across_restarts(tmp_path: Path) -> None:
    from relay.intake import JournalIntake
    from relay.journal import Journal

    journal = Journal(tmp_path, max_size=1 << 30, retention=3600)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for _ in range(2):
            source = DemoSource(Context("demo", "source", tmp_path), DemoSource.Settings(rate=10000, count=50))
            await source.open()
            with trio.fail_after(30):
                await source.run(JournalIntake("demo", journal, await journal.load_cursor("demo")))
        nursery.cancel_scope.cancel()
    await journal.close()
    assert journal.last_seq == 50
