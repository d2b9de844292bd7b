"""Parse workers: jobs run in another process, their errors come back as they were raised, a broken worker
costs nothing (the job runs on the event loop instead), and the workers die with a relay killed by -9."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
import structlog

import relay
from relay import metrics
from relay.in_worker import WORKER_NICENESS
from relay.workers import MAX_FAILURES, Workers, open_workers
from relay_plugins.http_bodies import BodyError, prepare_body
from relay_plugins.http_receiver import WORKER_MIN_BYTES
from tests.helpers import RelayProcess, config_dict, entry, free_port, journal_db, wait_until_sync, write_config

TOKEN = "workers-test-token-0123456789"


def _die_unless_in(pid: int) -> str:
    """Kills the worker process that runs it; returns normally only in process `pid` (the test's)."""
    if os.getpid() != pid:
        os._exit(3)
    return "ran on the event loop"


async def test_a_job_runs_in_another_process_and_its_errors_come_back() -> None:
    async with open_workers(1) as workers:
        assert await workers.run(os.getpid) != os.getpid()
        body = orjson.dumps([entry(id="a"), {"action": "user.created"}])
        prepared = await workers.run(prepare_body, body, "application/json", None)
        with pytest.raises(BodyError, match="not valid JSON"):
            await workers.run(prepare_body, b"[{", "application/json", None)
    assert len(prepared.accepted) == 1 and prepared.problems == [(1, "entry 1: occurred_at: missing")]
    assert prepared.accepted[0][4] == "api_key.created"  # a plain tuple, in NewEntry's order


def test_what_a_worker_imports_for_its_jobs_leaves_out_the_relay_s_heavy_dependencies() -> None:
    """A worker imports the job wrapper and the job's module, nothing more: the package root is lazy, so the
    first import chunk does not wait ~0.3 s for trio, pydantic and the rest to load in the worker."""
    code = ("import sys, relay.in_worker, relay_plugins.file_formats, relay_plugins.http_bodies; "
            "print(sorted(m for m in ('trio', 'pydantic', 'prometheus_client', 'structlog', 'httpx') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


async def test_a_worker_runs_at_a_lower_cpu_priority_than_the_relay_and_inline_jobs_do_not_change_it() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    async with open_workers(1) as workers:
        assert await workers.run(os.getpriority, os.PRIO_PROCESS, 0) == min(19, own + WORKER_NICENESS)
        assert await workers.run(os.getpriority, os.PRIO_PROCESS, 0) == min(19, own + WORKER_NICENESS), "once"
    async with open_workers(0) as inline:
        assert await inline.run(os.getpriority, os.PRIO_PROCESS, 0) == own


async def test_without_workers_a_job_runs_inline() -> None:
    async with open_workers(0) as workers:
        assert await workers.run(os.getpid) == os.getpid()
    assert metrics.parse_workers._value.get() == 0


async def test_a_broken_worker_costs_nothing_and_repeated_failures_disable_workers() -> None:
    async with open_workers(1) as workers:
        with structlog.testing.capture_logs() as logs:
            for _ in range(MAX_FAILURES):
                assert await workers.run(_die_unless_in, os.getpid()) == "ran on the event loop"
            assert await workers.run(os.getpid) == os.getpid()  # workers are now off
    events = [e["event"] for e in logs]
    assert events == ["parse_worker_failed"] * (MAX_FAILURES - 1) + ["parse_workers_disabled"]
    assert "restart the relay" in logs[-1]["hint"]
    assert metrics.parse_workers._value.get() == 0


def test_the_default_context_runs_jobs_inline(tmp_path: Path) -> None:
    context = relay.Context("x", "source", tmp_path)
    assert isinstance(context.workers, Workers) and context.workers.count == 0


def _start(relay_process: RelayProcess, workers: int) -> tuple[int, list[psutil.Process]]:
    """Start the relay and wait for its workers (started with it, for an import): its pid, and all its
    children (the workers, and multiprocessing's resource tracker), which must all exit with it."""
    relay_process.start()
    assert relay_process.proc is not None
    pid = relay_process.proc.pid
    wait_until_sync(lambda: len(_workers_of(pid)) == workers, 30, f"{workers} parse worker(s) started")
    return pid, psutil.Process(pid).children()


def _workers_of(pid: int) -> list[psutil.Process]:
    """The relay's worker processes (not multiprocessing's resource tracker, its other child)."""
    return [child for child in psutil.Process(pid).children() if "spawn_main" in " ".join(child.cmdline())]


def test_an_import_through_workers_survives_kill_9_and_the_workers_die_with_the_relay(tmp_path: Path) -> None:
    """`kill -9` mid-import: the worker processes exit on their own, and a restart imports every entry
    once, with the invalid lines quarantined under their line numbers."""
    total = 60_000
    data = tmp_path / "export.jsonl"
    with open(data, "wb") as f:
        for i in range(total):
            f.write(orjson.dumps(entry(id=f"e{i}")) + b"\n")
            if i == 123:
                f.write(b'{"action": "user.created", "occurred_at": "yesterday"}\n')
            if i == 40_000:
                f.write(b"{not json\n")
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, parse_workers=1,
        sources={"backfill": {"type": "file", "path": str(data)}},
        destinations={"out": {"type": "file", "path": str(tmp_path / "out.jsonl")}},
    ))
    relay_process = RelayProcess(config, tmp_path / "relay.log")
    try:
        _, children = _start(relay_process, 1)

        def imported() -> int:
            with journal_db(tmp_path / "state") as db:
                return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])

        wait_until_sync(lambda: imported() > 0, 60, "the import under way")
        relay_process.kill()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"outlived the relay: {[p.cmdline() for p in alive]}"
        assert imported() < total, "killed before the import finished"

        relay_process.start()
        wait_until_sync(lambda: imported() == total, 120, "every entry imported after the restart")
        assert relay_process.terminate() == 0
    finally:
        relay_process.stop_quietly()
    with journal_db(tmp_path / "state") as db:
        reasons = [row[0] for row in db.execute("SELECT reason FROM quarantine ORDER BY id")]
        distinct = db.execute("SELECT count(DISTINCT key) FROM entries").fetchone()[0]
    assert distinct == total
    assert len(reasons) == 2
    assert reasons[0] == (f"export.jsonl: line 125 (byte {_offset_of_line(data, 125)}): occurred_at: 'yesterday' "
                          "is not an RFC 3339 timestamp (e.g. 2024-05-14T09:30:00.123456Z)")
    assert reasons[1].startswith(f"export.jsonl: line 40003 (byte {_offset_of_line(data, 40_003)}) is not valid "
                                 "JSON: ")


def _offset_of_line(path: Path, number: int) -> int:
    offset = 0
    with open(path, "rb") as f:
        for _ in range(number - 1):
            offset += len(f.readline())
    return offset


def test_sigterm_stops_the_workers_with_the_relay(tmp_path: Path) -> None:
    data = tmp_path / "export.jsonl"
    data.write_bytes(orjson.dumps(entry(id="e1")) + b"\n")
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, parse_workers=2, sources={"backfill": {"type": "file", "path": str(data)}},
        destinations={"out": {"type": "stdout"}}))
    relay_process = RelayProcess(config, tmp_path / "relay.log")
    try:
        _, children = _start(relay_process, 2)
        assert relay_process.terminate() == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive
    finally:
        relay_process.stop_quietly()


def test_a_relay_that_imports_nothing_starts_its_workers_at_the_first_large_body(tmp_path: Path) -> None:
    """Workers cost ~50 MiB each: a push receiver whose senders send small bodies never needs one."""
    port = free_port()
    config = write_config(tmp_path / "relay.yaml", config_dict(
        tmp_path, parse_workers=1,
        sources={"push": {"type": "http", "listen": f"127.0.0.1:{port}", "auth": {"bearer_tokens": [TOKEN]}}}))
    relay_process = RelayProcess(config, tmp_path / "relay.log")
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {TOKEN}"}
    try:
        relay_process.start()
        assert relay_process.proc is not None
        pid = relay_process.proc.pid
        wait_until_sync(lambda: _healthy(url), 30, "the receiver to answer")
        assert httpx.post(f"{url}/v1/entries", content=orjson.dumps([entry(id="small")]), headers=headers,
                          timeout=30).status_code == 200
        assert _workers_of(pid) == [], "no worker for a small body"

        entries = [entry(id=f"e{i}", context={"pad": "x" * 600}) for i in range(2000)]
        body = orjson.dumps(entries)
        assert len(body) >= WORKER_MIN_BYTES
        answer = httpx.post(f"{url}/v1/entries", content=body, headers=headers, timeout=60)
        assert (answer.status_code, answer.json()["accepted"]) == (200, 2000)
        assert len(_workers_of(pid)) == 1, "a large body starts a worker"
        assert relay_process.terminate() == 0
    finally:
        relay_process.stop_quietly()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
