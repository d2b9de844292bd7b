"""splunk_hec benchmark: entries/s from a pre-filled journal to a HEC receiver, by the relay as a process.

    .venv/bin/python bench/bench_splunk_hec.py [--n 100000] [--json]

Receivers, each a separate process on 127.0.0.1:
- the strict peer receiver `shared/bench/peer/hec_receiver.py` (run from where it is, never copied; found
  next to the project or via $AUDIT_RELAY_SHARED), for gzip on and off;
- the project's fake HEC (`tests/fakes/hec.py --ack`), for indexer acknowledgement, which the peer lacks.
  It is slower than the peer, so it is also measured without ack to separate its cost from ack's.

Each run: journal pre-filled with N entries (demo entries with an `id`, so the receiver can count
distinct ids), then `relay run` with only the destination. The main figure is N / (time from starting
the relay until its offset has committed all N), which with `ack: true` includes waiting for the
confirmations; the second leaves out start-up (receiver's first to last event). Every run checks that
the receiver got N distinct entries.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio
import yaml

from common import ROOT, Report, cpu_seconds, peak_rss_bytes
from relay.entry import prepare
from relay.journal import Journal
from relay.journal_schema import JOURNAL_FILE
from relay_plugins.demo import DemoSource

TOKEN = "11111111-2222-3333-4444-555555555555"


def shared_dir() -> Path | None:
    candidates = [os.environ.get("AUDIT_RELAY_SHARED"), ROOT.parent / "shared", ROOT.parent.parent / "shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "bench" / "peer" / "hec_receiver.py").exists():
            return Path(candidate)
    return None


def make_entries(n: int) -> list[dict[str, Any]]:
    source = DemoSource.__new__(DemoSource)
    trio.run(source.open)
    rng = random.Random(20240514)
    out = []
    for i in range(n):
        value = source.make_entry(rng)
        value["id"] = f"bench-{i:08d}"
        out.append(value)
    return out


async def prefill(state_dir: Path, entries: list[dict[str, Any]]) -> None:
    journal = Journal(state_dir, max_size=1 << 34, retention=86400)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        prepared = [prepare(e) for e in entries]
        for i in range(0, len(prepared), 5000):
            await journal.append("bench", prepared[i:i + 5000], (), None, keep_cursor=True)
        nursery.cancel_scope.cancel()
    await journal.close()


def start_receiver(command: list[str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = workdir / "port"
    proc = subprocess.Popen([*command, "--port", "0", "--port-file", str(port_file)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "receiver.log", "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"receiver did not start: {(workdir / 'receiver.log').read_text()[-2000:]}")
        time.sleep(0.02)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def committed(state_dir: Path) -> int:
    """The destination's committed offset (read beside the running relay; WAL allows it)."""
    try:
        db = sqlite3.connect(f"file:{state_dir / JOURNAL_FILE}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute('SELECT "offset" FROM destinations WHERE name = ?', ("hec",)).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def run(label: str, n: int, entries_dir: Path, receiver: list[str], stats_path: str, settings: dict[str, Any],
        report: Report) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["cp", "-a", str(entries_dir), str(work / "state")], check=True)
        recv, url = start_receiver(receiver, work)
        try:
            config = work / "relay.yaml"
            config.write_text(yaml.safe_dump({
                "state_dir": str(work / "state"), "log": {"format": "json", "level": "warning"},
                "metrics": {"listen": None},
                "destinations": {"hec": {"type": "splunk_hec", "url": url, "token": TOKEN, **settings}},
            }))
            started = time.time()
            relay = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)], cwd=ROOT,
                                     stderr=open(work / "relay.log", "wb"))  # noqa: SIM115
            rss = 0
            while committed(work / "state") < n:
                time.sleep(0.05)
                rss = max(rss, peak_rss_bytes(relay.pid))
                if relay.poll() is not None:
                    raise SystemExit(f"relay exited: {(work / 'relay.log').read_text()[-3000:]}")
            done = time.time()
            cpu = cpu_seconds(relay.pid)
            time.sleep(0.3)
            got = stats(url + stats_path)
            relay.terminate()
            relay.wait(timeout=60)
        finally:
            recv.terminate()
            recv.wait(timeout=30)
    distinct = got.get("unique_ids", got.get("distinct_ids"))
    if got["events"] != n or distinct != n:
        print(f"WARNING {label}: receiver counted {got['events']} events, {distinct} distinct, expected {n}",
              file=sys.stderr)
    report.add(f"{label}: entries/s committed (incl. start-up)", n / (done - started), "entries/s")
    report.add(f"{label}: entries/s first to last event at the receiver",
               n / max(1e-9, got["last_event_at"] - got["first_event_at"]), "entries/s")
    report.add(f"{label}: relay CPU per entry", cpu / n * 1e6, "us")
    report.add(f"{label}: relay peak RSS", rss / 1048576, "MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--ack-n", type=int, default=30_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = Report("splunk_hec")
    fake = [sys.executable, str(ROOT / "tests" / "fakes" / "hec.py"), "--token", TOKEN]
    shared = shared_dir()
    with tempfile.TemporaryDirectory() as tmp:
        filled = Path(tmp) / "state"
        entries = make_entries(max(args.n, args.ack_n))
        trio.run(prefill, filled, entries[:args.n])
        if shared is not None:
            peer = [sys.executable, str(shared / "bench" / "peer" / "hec_receiver.py"), "--token", TOKEN]
            run("peer receiver, gzip", args.n, filled, peer, "/stats", {"compression": "gzip"}, report)
            run("peer receiver, no compression", args.n, filled, peer, "/stats", {"compression": "none"}, report)
        else:
            print("shared/bench/peer not found (set AUDIT_RELAY_SHARED): peer rows skipped", file=sys.stderr)
        small = Path(tmp) / "small"
        trio.run(prefill, small, entries[:args.ack_n])
        run("fake HEC, gzip, no ack", args.ack_n, small, fake, "/fake/stats", {}, report)
        run("fake HEC, gzip, ack (poll 1s, concurrency 32)", args.ack_n, small, [*fake, "--ack"], "/fake/stats",
            {"ack": True, "ack_poll_interval": "1s"}, report)
        run("fake HEC, gzip, ack (poll 10s default, concurrency 32)", args.ack_n, small, [*fake, "--ack"],
            "/fake/stats", {"ack": True}, report)
    report.print()


if __name__ == "__main__":
    main()
