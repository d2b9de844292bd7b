"""A destination coming back after an outage: drain a journal backlog to HEC; memory and start-up.

    .venv/bin/python bench/bench_backlog.py [--sizes 100000,1000000] [--json]

For each size N: a journal pre-filled with N entries (fixed-seed demo entries with an `id`), then
`relay run` with one `splunk_hec` destination (no compression) into the peer's strict HEC receiver (or
the project's fake HEC when `shared/` is not next to the project). Reported per N:
- start to ready: from spawning the process to its `relay_ready` log line (journal open, destination
  registered) — the issue's "relay run start to ready with a 1M-entry journal";
- drain rate: N / (time from start until the destination's offset has committed all N);
- peak RSS during the drain, which should not grow with N.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench_peer import TOKEN, start_receiver, stats, write_data
from common import ROOT, Report, cpu_seconds, peak_rss_bytes
from relay.journal_schema import JOURNAL_FILE


def prefill(state: Path, data: Path) -> int:
    """Journal the data file (`relay_import`); how many entries the journal then holds."""
    relay_import(state, data)
    with sqlite3.connect(state / JOURNAL_FILE) as db:
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])


def relay_import(state: Path, data: Path) -> None:
    """Journal the data file into `state` with `relay import` (the product's own path), then forget the
    source; its configuration is written beside `state`."""
    config = state.parent / "import.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state), "log": {"level": "warning", "format": "json"},
                                      "metrics": {"listen": None},
                                      "sources": {"backfill": {"type": "file", "path": str(data)}}}))
    subprocess.run([sys.executable, "-m", "relay", "import", "--config", str(config), "--source", "backfill",
                    str(data)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def offset(state: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{state / JOURNAL_FILE}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute('SELECT "offset" FROM destinations WHERE name = ?', ("splunk",)).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def drain(n: int, state: Path, work: Path, report: Report) -> None:
    receiver, url, kind = start_receiver(work)
    log = work / "relay.log"
    try:
        config = work / "relay.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(state), "log": {"format": "json", "level": "info"}, "metrics": {"listen": None},
            "destinations": {"splunk": {"type": "splunk_hec", "url": url, "token": TOKEN, "compression": "none"}},
        }))
        started = time.perf_counter()
        with open(log, "wb") as sink:
            relay = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)], cwd=ROOT,
                                     stdout=sink, stderr=sink)
        ready_at = None
        rss = 0
        try:
            while True:
                if ready_at is None and b'"relay_ready"' in log.read_bytes():
                    ready_at = time.perf_counter() - started
                rss = max(rss, peak_rss_bytes(relay.pid))
                if offset(state) >= n:
                    break
                if relay.poll() is not None:
                    raise SystemExit(f"relay exited: {log.read_text()[-3000:]}")
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(relay.pid)
        finally:
            relay.terminate()
            relay.wait(timeout=120)
        got = stats(url)
        if got["events"] != n:
            raise SystemExit(f"{kind} got {got['events']} events, expected {n}")
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
    report.add(f"start to ready, {n:,}-entry journal", (ready_at or 0) * 1000, "ms")
    report.add(f"drain to splunk_hec, {n:,} entries", n / elapsed, "entries/s")
    report.add(f"  relay CPU per entry, {n:,}", cpu / n * 1e6, "us")
    report.add(f"  relay peak RSS, {n:,}", rss / 1048576, "MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = Report("backlog")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for n in (int(s) for s in args.sizes.split(",")):
            data = tmp / f"data-{n}.jsonl"
            write_data(data, n)
            state = tmp / f"state-{n}"
            held = prefill(state, data)
            data.unlink()
            work = tmp / f"run-{n}"
            work.mkdir()
            drain(held, state, work, report)
            shutil.rmtree(state)
    report.print()


if __name__ == "__main__":
    main()
