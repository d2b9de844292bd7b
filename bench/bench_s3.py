"""S3 destination benchmark: a full journal drained into moto's S3 server (SigV4 checked) by the relay.

    .venv/bin/python bench/bench_s3.py [--n 100000] [--json]

The journal is filled first (demo entries), then `relay run` starts with only an `s3` destination and the
clock runs until its committed offset reaches the last entry (start-up included). moto is a single Python
process that parses, verifies and stores every request, so it may bound these figures rather than the
relay: compare the two processes' CPU time per entry. On a busy machine the wall-clock rates mostly
measure the wait for a core; CPU per entry is the steadier figure.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import yaml
from bench_engine import make_entries

from common import ROOT, Report, cpu_seconds, peak_rss_bytes
from relay.entry import prepare
from relay.journal import Journal
from relay.journal_schema import JOURNAL_FILE
from tests.moto_s3 import MotoS3

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("gzip, default batches (10 MiB)", {}),
    ("gzip, 5,000-entry batches", {"batch": {"max_entries": 5000}}),
    ("no compression, default batches", {"compression": "none"}),
]


async def fill_journal(state_dir: Path, entries: list[dict[str, object]]) -> int:
    journal = Journal(state_dir, max_size=1 << 34, retention=7 * 86400)
    await journal.open()
    prepared = [prepare(e) for e in entries]
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for i in range(0, len(prepared), 1000):
            await journal.append("bench", prepared[i:i + 1000], (), None, keep_cursor=True)
        nursery.cancel_scope.cancel()
    await journal.close()
    return sum(len(e.data) for e in prepared)


def offset(state_dir: Path) -> int:
    db = sqlite3.connect(f"file:{state_dir / JOURNAL_FILE}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT \"offset\" FROM destinations WHERE name = 's3'").fetchone()
        return int(row[0]) if row else 0
    except sqlite3.OperationalError:  # the relay has not created its tables' rows yet
        return 0
    finally:
        db.close()


def drain(moto: MotoS3, entries: list[dict[str, object]], label: str, settings: dict[str, Any],
          report: Report) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        raw_bytes = trio.run(fill_journal, state, entries)
        bucket = moto.new_bucket()
        config = Path(tmp) / "relay.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(state), "log": {"format": "json", "level": "warning"}, "metrics": {"listen": None},
            "destinations": {"s3": {"type": "s3", "bucket": bucket, "endpoint_url": moto.endpoint,
                                    "access_key_id": moto.relay.id, "secret_access_key": moto.relay.secret,
                                    # the backlog goes in full batches; only the last one would wait max_wait
                                    "batch": {"max_wait": "100ms", **settings.get("batch", {})},
                                    **{k: v for k, v in settings.items() if k != "batch"}}},
        }))
        assert moto.proc is not None
        moto_cpu = cpu_seconds(moto.proc.pid)
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)], cwd=ROOT)
        try:
            rss = 0
            while offset(state) < len(entries):
                time.sleep(0.02)  # polling another process's journal
                rss = max(rss, peak_rss_bytes(proc.pid))
                if proc.poll() is not None:
                    raise SystemExit(f"relay exited with {proc.returncode}")
            elapsed = time.perf_counter() - started
            relay_cpu = cpu_seconds(proc.pid)
            moto_cpu = cpu_seconds(moto.proc.pid) - moto_cpu
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        stored = moto.objects(bucket)
    stored_bytes = sum(len(body) for body in stored.values())
    report.add(f"{label}: entries/s", len(entries) / elapsed, "entries/s")
    report.add(f"{label}: uncompressed MiB/s", raw_bytes / elapsed / 1048576, "MiB/s")
    report.add(f"{label}: objects", len(stored), "objects")
    report.add(f"{label}: compression ratio", raw_bytes / stored_bytes, "x")
    report.add(f"{label}: relay CPU per entry", relay_cpu / len(entries) * 1e6, "us")
    report.add(f"{label}: moto CPU per entry", moto_cpu / len(entries) * 1e6, "us")
    report.add(f"{label}: relay peak RSS", rss / 1048576, "MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = Report("s3")
    entries = make_entries(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        moto = MotoS3(Path(tmp) / "moto.log").start()
        try:
            for label, settings in VARIANTS:
                drain(moto, entries, label, settings, report)
        finally:
            moto.stop()
    report.print()


if __name__ == "__main__":
    main()
