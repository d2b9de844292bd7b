"""The operator's commands: check --connect, status, replay, cursor show/set, and the progress display."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from relay import replay
from relay.cli import main
from relay.connectivity import check_all
from relay.pidfile import PID_FILE, PidFile, StateDirBusy, holder
from relay.progress import Progress
from tests import feeding, scripted
from tests.feeding import entry_ids
from tests.helpers import ROOT, config_dict, entry, journal_db, make_config, running_relay, write_config

EXTRA = [scripted, feeding]


def test_check_connect_prints_a_table_and_fails_on_any_failure(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, {"demo": {"type": "demo"}},
        {"good": {"type": "file", "path": str(tmp_path / "out.jsonl")},
         "bad": {"type": "file", "path": str(tmp_path / "not-a-dir" / "out.jsonl")}}))
    result = subprocess.run([sys.executable, "-m", "relay", "check", "--connect", "--config", str(config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["KIND", "NAME", "TYPE", "RESULT", "DETAIL"]
    rows = {tuple(line.split()[:4]) for line in lines[2:]}
    assert {("destination", "bad", "file", "FAILED"), ("destination", "good", "file", "ok"),
            ("source", "demo", "demo", "ok")} == rows
    assert "not-a-dir" in next(line for line in lines if " bad " in line), "the reason is shown"
    assert "1 of 3 check(s) failed" in result.stderr


async def test_check_all_runs_sources_bind_tests(tmp_path: Path) -> None:
    config = make_config(config_dict(tmp_path, {"push": {"type": "feed", "feed": "x",
                                                         "fail_open": "cannot bind 127.0.0.1:8080: in use"}},
                                     {"out": {"type": "scripted", "script": "main"}}), extra=EXTRA)
    results = await check_all(config)
    assert [(r.kind, r.name, r.ok, r.detail) for r in results] == [
        ("destination", "out", True, "no check available for this destination type"),
        ("source", "push", False, "OSError: cannot bind 127.0.0.1:8080: in use")]


def test_pid_file_lock(tmp_path: Path) -> None:
    first = PidFile.acquire(tmp_path)
    try:
        assert holder(tmp_path) is not None and holder(tmp_path).pid == os.getpid()  # type: ignore[union-attr]
        with pytest.raises(StateDirBusy, match=rf"another process \(pid {os.getpid()}: relay run\)"):
            PidFile.acquire(tmp_path, "cursor set")
    finally:
        first.release()
    assert not (tmp_path / PID_FILE).exists() and holder(tmp_path) is None

    (tmp_path / PID_FILE).write_text("999999\nrun\n")  # left by a relay killed with -9: nobody holds its lock
    assert holder(tmp_path) is None
    with PidFile.acquire(tmp_path):
        assert (tmp_path / PID_FILE).read_text() == f"{os.getpid()}\nrun\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_replay_redelivers_a_time_range_to_one_destination_only(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    scripted.SCRIPTS["a"], scripted.SCRIPTS["b"] = a, b = scripted.Script(), scripted.Script()
    data = config_dict(tmp_path, {"in": {"type": "manual"}}, {"a": {"type": "scripted", "script": "a"},
                                                             "b": {"type": "scripted", "script": "b"}})
    # The CLI only needs the names and the state dir: the same config with an installed type.
    cli_config = str(write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, {"in": {"type": "demo"}}, {"a": {"type": "file", "path": str(tmp_path / "a")},
                                             "b": {"type": "file", "path": str(tmp_path / "b")}})))
    times = {"early": "2024-05-13T23:59:59.000000Z", "in1": "2024-05-14T00:00:00.000000Z",
             "in2": "2024-05-14T09:30:00.000000Z", "in3": "2024-05-14T23:59:59.999999Z",
             "late": "2024-05-15T00:00:00.000000Z"}
    try:
        async with running_relay(make_config(data, extra=EXTRA)) as service:
            await service.sources["in"].intake.submit([entry(id=k, occurred_at=t) for k, t in times.items()])
            with trio.fail_after(5):
                await service.destinations["b"].loop.wait_offset(5)
                await service.destinations["a"].loop.wait_offset(5)

            args = ["replay", "--config", cli_config, "-d", "a", "--since", "2024-05-14", "--until", "2024-05-15"]
            code, out, _ = await trio.to_thread.run_sync(_cli, capsys, *args, "--dry-run")
            assert code == 0 and out.startswith("3 entries (")
            assert "would be delivered again to a" in out
            code, out, _ = await trio.to_thread.run_sync(_cli, capsys, *args)
            assert code == 0, out
            assert "3 entries queued again for a; the running relay sends them within seconds" in out

            await service.sources["in"].intake.submit([entry(id="after")])
            with trio.fail_after(10):
                await service.destinations["a"].loop.wait_offset(9)
                await service.destinations["b"].loop.wait_offset(9)

            code, out, _ = await trio.to_thread.run_sync(_cli, capsys, "status", "--config", cli_config, "--json")
            report = json.loads(out)
            assert report["relay"] == {"running": True, "pid": os.getpid(), "holder": "relay run"}
            assert {d["name"]: d["backlog"] for d in report["destinations"]} == {"a": 0, "b": 0}
            assert all(d["lag_seconds"] > 0 and d["oldest_undelivered_age_seconds"] == 0
                       for d in report["destinations"])
    finally:
        scripted.SCRIPTS.pop("a", None)
        scripted.SCRIPTS.pop("b", None)
    assert entry_ids(a.delivered) == [*times, "in1", "in2", "in3", "after"]
    assert entry_ids(b.delivered) == [*times, "after"], "the other destination is not touched"
    with journal_db(tmp_path / "state") as db:
        assert [r[0] for r in db.execute("SELECT route FROM entries ORDER BY seq")] == [None] * 5 + ["a"] * 3 + [None]

    code, _, err = _cli(capsys, "replay", "--config", cli_config, "-d", "nope", "--since", "1d")
    assert code == 2 and "no destination 'nope'" in err
    code, _, err = _cli(capsys, "replay", "--config", cli_config, "-d", "a", "--since", "yesterday")
    assert code == 2 and "'yesterday' is not a time" in err


def test_parse_time() -> None:
    now = 1_715_680_000.0
    assert replay.parse_time("2024-05-14T09:30:00Z") == 1_715_679_000.0
    assert replay.parse_time("2024-05-14T11:30:00+02:00") == 1_715_679_000.0
    assert replay.parse_time("2024-05-14 09:30") == 1_715_679_000.0
    assert replay.parse_time("2024-05-14") == 1_715_644_800.0
    assert replay.parse_time("6h", now) == now - 6 * 3600
    with pytest.raises(ValueError, match="is not a time"):
        replay.parse_time("last tuesday")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_cursor_show_and_set(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = config_dict(tmp_path, {"in": {"type": "manual"}}, {"out": {"type": "scripted", "script": "main"}})
    cli_config = str(write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, {"in": {"type": "demo"}}, {"out": {"type": "file", "path": str(tmp_path / "o")}})))
    scripted.SCRIPTS["main"] = scripted.Script()
    config = make_config(data, extra=EXTRA)
    async with running_relay(config) as service:
        await service.sources["in"].intake.submit([entry()], cursor="page-42")
        code, out, _ = await trio.to_thread.run_sync(_cli, capsys, "cursor", "show", "--config", cli_config,
                                                     "-s", "in", "--json")
        assert code == 0 and json.loads(out)["cursor"] == "page-42"
        code, _, err = await trio.to_thread.run_sync(_cli, capsys, "cursor", "set", "--config", cli_config,
                                                     "-s", "in", "--value", "page-7", "--yes")
        assert code == 1, "refused while the relay runs: its source would overwrite the cursor"
        assert "relay run) is using" in err and "stop the relay" in err

    code, _, err = _cli(capsys, "cursor", "set", "--config", cli_config, "-s", "in", "--value", "page-7")
    assert code == 2 and "add --yes" in err, "no terminal to ask on"
    monkeypatch.setattr(sys, "stdin", Tty("n\n"))
    code, out, _ = _cli(capsys, "cursor", "set", "--config", cli_config, "-s", "in", "--value", "page-7")
    assert code == 1 and "cursor unchanged" in out
    monkeypatch.setattr(sys, "stdin", Tty("y\n"))
    code, out, _ = _cli(capsys, "cursor", "set", "--config", cli_config, "-s", "in", "--value", "page-7")
    assert code == 0 and "source in: cursor 'page-42' -> 'page-7'" in out
    async with running_relay(config) as service:
        assert service.sources["in"].intake.cursor == "page-7"
    code, _, _ = _cli(capsys, "cursor", "set", "--config", cli_config, "-s", "in", "--clear", "--yes")
    assert code == 0
    code, out, _ = _cli(capsys, "cursor", "show", "--config", cli_config, "-s", "in")
    assert "(none)" in out
    code, _, err = _cli(capsys, "cursor", "show", "--config", cli_config, "-s", "other")
    assert code == 2 and "no source 'other'" in err


def test_progress_only_on_a_terminal() -> None:
    piped = io.StringIO()
    with Progress(100, stream=piped) as progress:
        progress.update(50)
    assert piped.getvalue() == ""

    clock: list[float] = [0.0]
    tty = Tty()
    progress = Progress(1000, stream=tty, clock=lambda: clock[0])
    for second in range(1, 6):
        clock[0] = float(second)
        progress.update(100 * second)
    assert progress.render() == "500/1,000 entries (50%)  100/s  ETA 0:05"
    clock[0] = 10.0
    progress.update(1000)
    progress.finish()
    assert tty.getvalue().startswith("\r100/1,000 entries (10%)")
    assert tty.getvalue().endswith("1,000/1,000 entries (100%)  100/s  in 0:10\n")

