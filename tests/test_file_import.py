"""Source `file` and `relay import`: each format read completely, interrupted and resumed without loss or
duplicates, finished imports not repeated, unreadable records quarantined with where they were."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import relay
from relay.journal import Journal
from relay_plugins import file_formats
from relay_plugins.file_formats import BLOCK, FIRST_BLOCK, MAX_RECORD, CsvReader, JsonArrayReader
from relay_plugins.file_import import FileImportSettings, FileImportSource, ImportBusy, Mark
from tests.helpers import (
    ROOT,
    config_dict,
    entry,
    make_config,
    running_relay,
    wait_until,
    wait_until_sync,
    write_config,
)
from tests.journal_harness import context_for, cursor, intake_for, open_journal, quarantined, stored

TRICKY = ["plain", "with ] and , and } inside", 'quote " and \\ backslash', "unicode: é ✓ 🚀", "line\nbreak",
          "[not, an, array]"]


def entries(n: int) -> list[dict[str, Any]]:
    return [entry("user.created", occurred_at=f"2024-05-14T09:{i // 60 % 60:02d}:{i % 60:02d}.{i:06d}Z",
                  metadata={"note": TRICKY[i % len(TRICKY)], "count": str(i)},
                  targets=[{"type": "user", "id": f"u{i}", "name": TRICKY[(i + 1) % len(TRICKY)]}])
            for i in range(n)]


CSV_COLUMNS = ["action", "version", "occurred_at", "actor.type", "actor.id", "actor.name", "actor.metadata",
               "targets", "context.location", "context.user_agent", "metadata"]


def write(path: Path, values: list[dict[str, Any]], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_bytes(b"".join(orjson.dumps(v) + b"\n" for v in values))
    elif fmt == "json":
        path.write_bytes(orjson.dumps(values, option=orjson.OPT_INDENT_2))
    else:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for v in values:
            writer.writerow([v["action"], v["version"], v["occurred_at"], v["actor"]["type"], v["actor"]["id"],
                             v["actor"]["name"], json.dumps(v["actor"]["metadata"]), json.dumps(v["targets"]),
                             v["context"]["location"], v["context"]["user_agent"], json.dumps(v["metadata"])])
        path.write_text(out.getvalue(), encoding="utf-8", newline="")
    return path


async def run_import(journal: Journal, path: Path, name: str = "backfill", *, stop_after: int | None = None,
                     **overrides: Any) -> tuple[FileImportSource, list[relay.SubmitResult]]:
    """Run the source until it returns, or cancel it right after its `stop_after`-th commit (a crash)."""
    source = FileImportSource(context_for(journal, name), FileImportSettings.model_validate(
        {"path": str(path), "chunk_entries": 7, **overrides}))
    intake = await intake_for(journal, name)
    results: list[relay.SubmitResult] = []
    with trio.CancelScope() as scope:
        def counting(submit: Any) -> Any:
            async def submit_and_count(items: Any, *, cursor: Any, **where: Any) -> relay.SubmitResult:
                results.append(await submit(items, cursor=cursor, **where))
                if stop_after is not None and len(results) >= stop_after:
                    scope.cancel()
                return results[-1]
            return submit_and_count

        intake.submit = counting(intake.submit)  # type: ignore[method-assign]
        intake.submit_prepared = counting(intake.submit_prepared)  # type: ignore[method-assign]
        await source.open()
        await source.run(intake)
    await source.close()
    return source, results


FORMATS = ["jsonl", "json", "csv"]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_each_format_imports_every_entry(tmp_path: Path, fmt: str) -> None:
    values = entries(40)
    path = write(tmp_path / f"export.{fmt}", values, fmt)
    async with open_journal(tmp_path / "state") as journal:
        source, results = await run_import(journal, path)
    assert [orjson.loads(d) for d in stored(tmp_path / "state")] == values
    assert sum(r.accepted for r in results) == 40 and source.progress.finished
    mark = Mark.decode(cursor(tmp_path / "state", "backfill"))
    assert mark is not None and mark.done and mark.format == fmt and mark.offset == path.stat().st_size


@pytest.mark.parametrize("fmt", FORMATS)
async def test_interrupted_import_resumes_where_it_stopped_and_is_not_repeated(tmp_path: Path, fmt: str) -> None:
    values = entries(60)
    path = write(tmp_path / f"export.{fmt}", values, fmt)
    state = tmp_path / "state"
    async with open_journal(state) as journal:
        first, _ = await run_import(journal, path, stop_after=3)
        assert not first.progress.finished and len(stored(state)) == 21
        _, after = await run_import(journal, path)
        third, again = await run_import(journal, path)
    assert sum(r.accepted for r in after) == 39 and sum(r.duplicates for r in after) == 0, "resumed, not re-read"
    assert [orjson.loads(d) for d in stored(state)] == values
    assert again == [] and third.progress.already_done, "a finished file is not imported again"


async def test_a_different_file_at_the_same_path_is_imported_from_its_start(tmp_path: Path) -> None:
    path = write(tmp_path / "export.jsonl", entries(10), "jsonl")
    async with open_journal(tmp_path / "state") as journal:
        await run_import(journal, path)
        write(path, entries(15), "jsonl")
        _, results = await run_import(journal, path)
    assert (sum(r.accepted for r in results), sum(r.duplicates for r in results)) == (5, 10)


async def test_unreadable_records_are_quarantined_with_line_or_row_and_byte(tmp_path: Path) -> None:
    good = [orjson.dumps(e) for e in entries(3)]
    jsonl = tmp_path / "export.jsonl"
    jsonl.write_bytes(good[0] + b"\n\n" + b'{"action": oops}\r\n' + good[1] + b"\n" + b"[1, 2]\n" + good[2])
    table = tmp_path / "export.csv"
    table.write_text("action,occurred_at,actor.type,actor.id,targets,Exported by\n"
                     "user.created,2024-05-14T09:00:00Z,user,u1,\"[{\"\"type\"\":\"\"user\"\"}]\",ops@example.com\n"
                     "user.created,2024-05-14T09:00:01Z,user,u2,{not json},x\n"
                     "user.created,2024-05-14T09:00:02Z,user,u3,,x,one too many\n", encoding="utf-8")
    state = tmp_path / "state"
    async with open_journal(state) as journal:
        await run_import(journal, jsonl, "lines")
        await run_import(journal, table, "table")
    kept = {data: reason for reason, data in quarantined(state)}  # one group commit: in no particular order
    offset = len(good[0]) + 2
    assert kept[b'{"action": oops}'] == (f"export.jsonl: line 3 (byte {offset}) is not valid JSON: unexpected "
                                         "character, expected a JSON value at column 12")
    offset += len(b'{"action": oops}\r\n') + len(good[1]) + 1
    assert kept[b"[1, 2]"] == f"export.jsonl: line 5 (byte {offset}): an entry must be a JSON object, not an array"
    rows = table.read_bytes().splitlines()
    assert kept[rows[2]] == (f"export.csv: row 2 (byte {len(rows[0]) + len(rows[1]) + 2}): column 'targets' "
                             "should hold JSON text: unexpected character, expected a string key")
    assert kept[rows[3]].startswith("export.csv: row 3 (byte ")
    assert kept[rows[3]].endswith("7 cells but the header names 6 columns")
    assert len(kept) == 4
    assert len(stored(state, "lines")) == 3
    (kept,) = [orjson.loads(d) for d in stored(state, "table")]
    assert kept["extra"] == {"Exported by": "ops@example.com"} and kept["targets"] == [{"type": "user"}]


def test_csv_columns_map_to_entry_fields() -> None:
    data = ("\ufeffaction,version,occurred_at,actor.type,actor.id,actor.metadata,context.location,"
            "metadata,targets,Source IP,actor.metadata.extra\n"
            'user.created,2,2024-05-14T09:00:00Z,user,u1,"{""role"":""admin""}",1.2.3.4,,"[]",5.6.7.8,\n')
    reader = CsvReader(io.BytesIO(data.encode("utf-8")), 0, 0)
    chunk = reader.read(10)
    assert chunk.bad == [] and chunk.done
    assert chunk.items == [{"action": "user.created", "version": 2, "occurred_at": "2024-05-14T09:00:00Z",
                            "actor": {"type": "user", "id": "u1", "metadata": {"role": "admin"}},
                            "context": {"location": "1.2.3.4"}, "targets": [], "extra": {"Source IP": "5.6.7.8"}}]


async def test_a_broken_json_array_stops_with_an_error_and_resumes_once_fixed(tmp_path: Path) -> None:
    values = entries(400)  # the break comes after the first 64 KiB, so fixing it keeps the fingerprint
    text = orjson.dumps(values, option=orjson.OPT_INDENT_2)
    cut = text.index(b'"count": "300"')
    path = tmp_path / "export.json"
    path.write_bytes(text[:cut] + b"BROKEN" + text[cut:])
    state = tmp_path / "state"
    async with open_journal(state) as journal:
        failed, _ = await run_import(journal, path, chunk_entries=50)
        mark = Mark.decode(cursor(state, "backfill"))
        assert mark is not None and not mark.done and mark.records == 300
        assert failed.progress.error is not None and "item 301 (byte " in failed.progress.error
        path.write_bytes(text)
        fixed, results = await run_import(journal, path, chunk_entries=50)
    assert sum(r.accepted for r in results) == 100 and sum(r.duplicates for r in results) == 0
    assert [orjson.loads(d) for d in stored(state)] == values and fixed.progress.finished


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8, 13])
def test_json_array_items_spanning_reads(window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_formats, "_READ", window)
    text = '[ 12345 , -1.5e10,"x, ]",{"a":[1,{"b":"é"}]} , true,null, NaN,\n[]\t]'.encode()
    reader = JsonArrayReader(io.BytesIO(text), 0, 0)
    chunk = reader.read(100)
    assert chunk.done and chunk.error is None and chunk.offset == len(text)
    assert chunk.items[:6] == [12345, -1.5e10, "x, ]", {"a": [1, {"b": "é"}]}, True, None]
    assert repr(chunk.items[6]) == "NaN" and chunk.items[7] == []
    with pytest.raises(relay.EntryError, match="cannot be represented as JSON"):
        from relay.entry import prepare
        prepare({**entry(), "metadata": {"x": chunk.items[6]}})


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                       | st.text(),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                       max_leaves=12)


@settings(max_examples=120, deadline=None)
@given(values=st.lists(_values, max_size=12), indent=st.sampled_from([None, 1, 4]),
       window=st.integers(1, 40), chunk=st.integers(1, 5), stop=st.integers(0, 12))
def test_json_array_reader_agrees_with_json_loads_and_resumes_anywhere(
        values: list[Any], indent: int | None, window: int, chunk: int, stop: int) -> None:
    text = json.dumps(values, indent=indent, ensure_ascii=False).encode()
    original = file_formats._READ
    file_formats._READ = window
    try:
        reader = JsonArrayReader(io.BytesIO(text), 0, 0)
        first = reader.read(min(stop, len(values))) if stop else file_formats.Chunk()
        resumed = JsonArrayReader(io.BytesIO(text), first.offset, first.records)
        rest: list[Any] = []
        while True:
            part = resumed.read(chunk)
            rest += part.items
            assert part.error is None
            if part.done:
                break
    finally:
        file_formats._READ = original
    assert first.items + rest == json.loads(text)


async def test_the_relay_runs_a_file_source_once(tmp_path: Path) -> None:
    path = write(tmp_path / "export.json", entries(30), "json")
    output = tmp_path / "out.jsonl"
    data = config_dict(tmp_path, {"backfill": {"type": "file", "path": str(path), "chunk_entries": 10}},
                       {"out": {"type": "file", "path": str(output)}})
    for _ in range(2):
        async with running_relay(make_config(data)) as service:
            running = service.sources["backfill"]
            await wait_until(lambda r=running: r.finished, 30, "the import to finish")
            await service.destinations["out"].loop.wait_offset(30)
    assert len(output.read_bytes().splitlines()) == 30, "the second start imported nothing again"


async def test_two_imports_under_one_name_exclude_each_other(tmp_path: Path) -> None:
    path = write(tmp_path / "export.jsonl", entries(5), "jsonl")
    async with open_journal(tmp_path / "state") as journal:
        blocker = FileImportSource(context_for(journal, "backfill"), FileImportSettings(path=path))
        lock = blocker._lock()
        try:
            with pytest.raises(ImportBusy, match="another process is importing as source 'backfill'"):
                await run_import(journal, path)
        finally:
            os.close(lock)


async def test_check_names_missing_csv_columns(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("Action,When\nx,y\n")
    source = FileImportSource(relay.Context("f", "source", tmp_path), FileImportSettings(path=path))
    with pytest.raises(relay.CheckFailed, match=r"no column action, occurred_at, actor\.type, actor\.id"):
        await source.check()
    write(path, entries(1), "csv")
    assert await source.check() == f"{path}: csv, {path.stat().st_size:,} bytes"


def _relay_import(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "import", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=120)


def test_relay_import_command_resumes_after_kill_9(tmp_path: Path) -> None:
    values = entries(6000)
    path = write(tmp_path / "export.jsonl", values, "jsonl")
    state = tmp_path / "state"
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, {"backfill": {"type": "file", "path": "/not/used", "chunk_entries": 200}}, {}))
    process = subprocess.Popen([sys.executable, "-m", "relay", "import", "--config", str(config), "-s", "backfill",
                                str(path)], cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def committed() -> int:
        try:
            mark = Mark.decode(cursor(state, "backfill"))
        except sqlite3.Error:  # not created yet
            return 0
        return mark.records if mark else 0

    try:
        wait_until_sync(lambda: committed() >= 400, 60, "a few chunks committed")
        process.kill()
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    partial = len(stored(state))
    assert 0 < partial < 6000, "killed mid-import"
    resumed = _relay_import(config, "--source", "backfill", str(path))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6000 - partial:,} new entries, 0 already in the journal" in resumed.stderr
    assert [orjson.loads(d) for d in stored(state)] == values
    again = _relay_import(config, "--source", "backfill", str(path))
    assert again.returncode == 0 and "nothing to do: this file was imported completely before" in again.stderr


def test_relay_import_refuses_a_source_of_another_type(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", config_dict(tmp_path, {"demo": {"type": "demo"}}, {}))
    result = _relay_import(config, "--source", "demo", str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and "is a 'demo' source; `relay import` runs sources of type 'file'" in result.stderr
    missing = _relay_import(config, "--source", "new", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 1 and "No such file or directory" in missing.stderr



async def test_lines_longer_than_a_block_are_read_alone_and_oversized_ones_quarantined(tmp_path: Path) -> None:
    """JSON lines go to the workers a block at a time; a line longer than a block is read on its own, one
    longer than MAX_RECORD is quarantined (its head) and skipped, and the lines around both are imported."""
    values = entries(4)
    long_entry = {**values[1], "metadata": {"blob": "x" * (BLOCK + 1000)}}
    huge = b'{"action": "' + b"y" * (MAX_RECORD + 10) + b'"}'
    lines = [orjson.dumps(values[0]), orjson.dumps(long_entry), huge, orjson.dumps(values[2]),
             orjson.dumps(values[3])]
    path = tmp_path / "export.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    async with open_journal(tmp_path / "state") as journal:
        source, _ = await run_import(journal, path, chunk_entries=10_000)
    assert [orjson.loads(d) for d in stored(tmp_path / "state")] == [values[0], long_entry, values[2], values[3]]
    reasons = [reason for reason, _ in quarantined(tmp_path / "state")]
    start = len(lines[0]) + len(lines[1]) + 2
    assert reasons == [f"export.jsonl: line 3 (byte {start}) is longer than {MAX_RECORD} bytes; its first "
                       f"65536 bytes are kept"]
    assert source.progress.finished and source.progress.quarantined == 1


async def test_blocks_grow_from_the_first_and_keep_file_order_and_line_labels(tmp_path: Path) -> None:
    """The first block is small (the first entries are journaled sooner) and each next one doubles: entries
    stay in file order across them, and a bad line deep in the file is labelled with its line and byte."""
    values = [{**v, "metadata": {"pad": "p" * 2000}} for v in entries(700)]  # ~1.5 MiB: 256 KiB, 512 KiB, ...
    lines = [orjson.dumps(v) for v in values]
    bad_at = 600  # past FIRST_BLOCK * 3 bytes, in the third block
    assert sum(len(line) + 1 for line in lines[:bad_at]) > 3 * FIRST_BLOCK
    lines.insert(bad_at, b'{"action": "user.created"}')
    path = tmp_path / "export.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    async with open_journal(tmp_path / "state") as journal:
        source, results = await run_import(journal, path, chunk_entries=10_000)
    assert [orjson.loads(d) for d in stored(tmp_path / "state")] == values
    assert len(results) >= 3, "several blocks, each its own commit"
    start = sum(len(line) + 1 for line in lines[:bad_at])
    assert [reason for reason, _ in quarantined(tmp_path / "state")] == [
        f"export.jsonl: line {bad_at + 1} (byte {start}): occurred_at: missing"]
    assert source.progress.finished and source.progress.quarantined == 1
