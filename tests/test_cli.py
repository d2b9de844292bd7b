"""The `relay` command: check, plugins, status, dlq, quarantine; exit codes and messages."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import relay
from relay.cli import main
from tests import scripted
from tests.helpers import ROOT, RelayProcess, config_dict, entry, make_config, running_relay, write_config


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def test_check_passes_on_the_example_config_with_the_example_env_file() -> None:
    result = run_cli("check", "--config", "relay.yaml.example", "--env-file", "relay.env.example")
    assert result.returncode == 0, result.stderr
    assert "relay.yaml.example: OK" in result.stdout


def test_check_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yaml", "sources:\n  demo:\n    type: demo\n    rat: 5\n"
                                                 "destinations:\n  out:\n    type: nope\n")
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:4: sources.demo.rat: unknown key (did you mean 'rate'?)" in result.stderr
    assert f"{config}:7: destinations.out.type: unknown destination type 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_an_invalid_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yaml", "sources:\n  demo:\n    type: demo\n    rate: -1\n")
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "sources.demo.rate" in result.stderr and "greater than 0" in result.stderr


def test_config_defaults_to_relay_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", config_dict(tmp_path, {"demo": {"type": "demo"}}))
    monkeypatch.setenv("RELAY_CONFIG", str(config))
    assert main(["check"]) == 0
    assert f"{config}: OK" in capsys.readouterr().out


def test_plugins_lists_types_with_their_package() -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {(r["kind"], r["type"]): r["package"] for r in json.loads(result.stdout)}
    assert rows[("destination", "file")].startswith("audit-relay ")
    assert rows[("source", "demo")].startswith("audit-relay ")
    assert rows[("destination", "batch_files")] == "audit-relay-example 1.0.0", "third-party plugin via entry point"


def test_version() -> None:
    assert run_cli("--version").stdout.strip() == f"audit-relay {relay.__version__}"


async def test_status_and_dead_letter_commands(tmp_path: Path, script: scripted.Script,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = config_dict(tmp_path, {"in": {"type": "manual"}}, {"out": {"type": "scripted", "script": "main"}})
    config_path = write_config(tmp_path / "relay.yaml", data)
    script.answers = [relay.Rejected({0: "HTTP 413 Payload Too Large"})]
    config = make_config(data, extra=[scripted])
    async with running_relay(config) as service:
        await service.sources["in"].intake.submit([entry("api_key.deleted"), entry("user.created")])
        with trio.fail_after(30):
            await service.destinations["out"].loop.wait_offset(2)

    # `relay status` and `relay dlq` read the journal; the scripted type is not installed, so they run
    # against a config naming the same state_dir with an installed type.
    write_config(config_path, config_dict(tmp_path, {"in": {"type": "demo"}},
                                          {"out": {"type": "file", "path": str(tmp_path / "x")}}))
    capsys.readouterr()
    assert main(["status", "--config", str(config_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (dest,) = report["destinations"]
    assert (dest["name"], dest["offset"], dest["backlog"], dest["dead_letters"], dest["delivered"]) == (
        "out", 2, 0, 1, 1)
    assert dest["newest_delivered_occurred_at"] == "2024-05-14T09:30:00.123456Z"
    assert main(["status", "--config", str(config_path)]) == 0
    text = capsys.readouterr().out
    assert "out" in text and "DEAD" in text

    assert main(["dlq", "list", "--config", str(config_path), "-d", "out", "--json"]) == 0
    (dead,) = json.loads(capsys.readouterr().out)
    assert (dead["seq"], dead["action"], dead["reason"]) == (1, "api_key.deleted", "HTTP 413 Payload Too Large")
    assert main(["dlq", "show", "--config", str(config_path), "-d", "out"]) == 0
    assert '"action":"api_key.deleted"' in capsys.readouterr().out
    assert main(["dlq", "replay", "--config", str(config_path), "-d", "out"]) == 0
    assert "1 dead letter(s) put back" in capsys.readouterr().out

    script.answers = []
    async with running_relay(config) as service:
        with trio.fail_after(30):
            await service.destinations["out"].loop.wait_offset(3)
    assert [e.action for e in script.delivered][-1] == "api_key.deleted"
    capsys.readouterr()
    assert main(["dlq", "list", "--config", str(config_path), "-d", "out", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


async def test_quarantine_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = config_dict(tmp_path, {"in": {"type": "manual"}}, {"out": {"type": "file", "path": str(tmp_path / "o")}})
    async with running_relay(make_config(data, extra=[scripted])) as service:
        await service.sources["in"].intake.submit([{"action": "x"}])
    config_path = write_config(tmp_path / "relay.yaml", {**data, "sources": {"in": {"type": "demo"}}})
    capsys.readouterr()
    assert main(["quarantine", "list", "--config", str(config_path), "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["reason"] == "entry 0: occurred_at: missing" and item["source"] == "in"
    assert main(["quarantine", "show", "--config", str(config_path), "--id", str(item["id"])]) == 0
    assert '{"action":"x"}' in capsys.readouterr().out


def test_run_takes_the_hard_limit_of_open_files(tmp_path: Path) -> None:
    """Started with systemd's default soft limit (1024), the relay raises it: each client of a push receiver
    is a file descriptor, and 1024 idle connections would otherwise lock valid senders out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit is {hard}: nothing to raise")
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, {"demo": {"type": "demo"}}, {"out": {"type": "file", "path": str(tmp_path / "out.jsonl")}}))
    relay_process = RelayProcess(config, tmp_path / "relay.log")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        relay_process.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert relay_process.proc is not None
        limits = Path(f"/proc/{relay_process.proc.pid}/limits").read_text()
        [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert int(line.split()[3]) > 1024, line
        assert any(e.get("event") == "open_files_limit_raised" for e in relay_process.events())
    finally:
        relay_process.stop_quietly()
