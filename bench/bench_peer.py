"""The issue-9 yardstick: file import -> durable journal -> splunk_hec (no compression) -> HEC receiver.

    .venv/bin/python bench/bench_peer.py [--n 200000] [--data FILE] [--reps 3] [--json]

The same shape of job as `shared/bench/peer` measures for syslog-ng: a JSONL file of audit entries
(~650 bytes each, each with an `id`) relayed into a strict HEC receiver that records every id. Run the
peer harness in the same sitting and compare the two figures; absolute numbers drift between runs.

Data: `--data FILE` (e.g. the peer's `audit-200000.jsonl`), else this script's own fixed-seed set.
Receiver: the peer's `hec_receiver.py` when `shared/` is next to the project (or $AUDIT_RELAY_SHARED),
else the project's fake HEC from the tests.
The relay runs as users run it: metrics endpoint on, durable journal, default batching (`--max-entries`
to try another). Figure: N / (receiver's time of the N-th event - relay start), like the peer's "end to end". Each run
checks the receiver saw exactly the N ids (no loss, no duplicates).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import trio
import yaml

from common import ROOT, Report, cpu_seconds, peak_rss_bytes, workers_peak_rss_bytes
from relay_plugins.demo import DemoSource, ulid
from tests.helpers import free_port

TOKEN = "11111111-2222-3333-4444-555555555555"


def shared_dir() -> Path | None:
    for candidate in (os.environ.get("AUDIT_RELAY_SHARED"), ROOT.parent / "shared", ROOT.parent.parent / "shared"):
        if candidate and (Path(candidate) / "bench" / "peer" / "hec_receiver.py").exists():
            return Path(candidate)
    return None


def write_data(path: Path, n: int) -> None:
    """Our own fixed-seed data set: demo entries (incident.io's catalog) with an `id` each."""
    source = DemoSource.__new__(DemoSource)
    trio.run(source.open)
    rng = random.Random(20240514)
    with open(path, "wb") as f:
        for i in range(n):
            value = source.make_entry(rng)
            value["id"] = bench_id(i)
            f.write(orjson.dumps(value) + b"\n")


def bench_id(i: int) -> str:
    """The i-th entry's id: a ULID one millisecond after the previous one's, unique by `i`, as the audit log
    gives them (the journal's dedupe keys depend on ids that begin with their time)."""
    return ulid(1715673600000 + i, i)


def start_receiver(tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    shared = shared_dir()
    port_file = tmp / "port"
    if shared is not None:
        python = "/tmp/peer-venv/bin/python" if Path("/tmp/peer-venv/bin/python").exists() else sys.executable
        cmd = [python, str(shared / "bench/peer/hec_receiver.py"), "--port", "0", "--port-file", str(port_file),
               "--token", TOKEN]
        kind = "peer hec_receiver.py"
    else:
        cmd = [sys.executable, str(ROOT / "tests/fakes/hec.py"), "--token", TOKEN, "--port-file", str(port_file)]
        kind = "tests/fakes/hec.py"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text().strip():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the HEC receiver did not start: {cmd}")
        time.sleep(0.02)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}", kind


def stats(url: str) -> dict[str, Any]:
    """The receiver's counters (`events`, `unique_ids`, `last_event_at`), whichever receiver it is."""
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError:  # the project's fake HEC
        with urllib.request.urlopen(f"{url}/fake/stats", timeout=5) as response:
            got: dict[str, Any] = json.loads(response.read())
        got.setdefault("unique_ids", got.get("distinct_ids"))
        got.setdefault("last_event_at", time.time())
        return got


def one_run(data: Path, n: int, tmp: Path, settings: dict[str, Any],
            parse_workers: str | int = "auto") -> dict[str, float]:
    receiver, url, _ = start_receiver(tmp)
    try:
        config = tmp / "relay.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(tmp / "state"), "log": {"format": "json", "level": "warning"},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"}, "parse_workers": parse_workers,
            "sources": {"backfill": {"type": "file", "path": str(data)}},
            "destinations": {"splunk": {"type": "splunk_hec", "url": url, "token": TOKEN, "compression": "none",
                                        **settings}},
        }))
        started = time.time()
        relay = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)], cwd=ROOT)
        rss = workers_rss = 0
        try:
            while True:
                time.sleep(0.05)
                rss = max(rss, peak_rss_bytes(relay.pid))
                workers_rss = max(workers_rss, workers_peak_rss_bytes(relay.pid))
                s = stats(url)
                if s["events"] >= n:
                    break
                if relay.poll() is not None:
                    raise SystemExit(f"relay exited with {relay.returncode}")
            cpu = cpu_seconds(relay.pid)
        finally:
            relay.terminate()
            relay.wait(timeout=60)
        s = stats(url)
        if s["unique_ids"] != n or s["events"] != n:
            raise SystemExit(f"receiver saw {s['events']} events, {s['unique_ids']} unique ids; expected {n}")
        return {"rate": n / (s["last_event_at"] - started), "cpu_us": cpu / n * 1e6, "rss_mib": rss / 1048576,
                "workers_rss_mib": workers_rss / 1048576}
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--parse-workers", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="the relay's parse_workers setting (default: auto)")
    parser.add_argument("--max-entries", type=int, help="the destination's batch.max_entries (default: its own)")
    args = parser.parse_args()
    report = Report("peer")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = args.data
        if data is None:
            data = tmp / "data.jsonl"
            write_data(data, args.n)
        with open(data, "rb") as f:
            n = sum(1 for _ in f)
        runs = []
        for rep in range(args.reps):
            run_dir = tmp / f"run{rep}"
            run_dir.mkdir()
            settings = {"batch": {"max_entries": args.max_entries}} if args.max_entries else {}
            runs.append(one_run(data, n, run_dir, settings, args.parse_workers))
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        report.add(f"file import -> journal -> splunk_hec (no gzip), {n:,} entries, parse_workers "
                   f"{args.parse_workers}, median of {args.reps}",
                   median["rate"], "entries/s")
        report.add("  min..max", min(r["rate"] for r in runs), "entries/s (min)")
        report.add("  ", max(r["rate"] for r in runs), "entries/s (max)")
        report.add("  relay CPU per entry (with its parse workers)", median["cpu_us"], "us")
        report.add("  relay peak RSS (main process)", median["rss_mib"], "MiB")
        report.add("  parse workers' peak RSS (sum)", median["workers_rss_mib"], "MiB")
    report.print()


if __name__ == "__main__":
    main()
