"""An idle relay: CPU used and memory over time with listeners open and nothing arriving.

    .venv/bin/python bench/bench_idle.py [--minutes 10] [--json]

The relay runs the push receiver, a `file` destination and the metrics endpoint (scraped every 15 s, as
Prometheus would), with no entries arriving. Reported: CPU as a share of one core over the period, and
RSS after a 10 s warm-up and at the end (the difference is the growth).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from common import ROOT, Report, cpu_seconds, rss_bytes, workers_rss_bytes
from tests.helpers import free_ports


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = Report("idle")
    with tempfile.TemporaryDirectory() as tmp:
        metrics_port, push_port = free_ports(2)
        config = Path(tmp) / "relay.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(Path(tmp) / "state"), "log": {"format": "json", "level": "warning"},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "sources": {"push": {"type": "http", "listen": f"127.0.0.1:{push_port}",
                                 "auth": {"bearer_tokens": ["idle-bench-token-0123456789"]}}},
            "destinations": {"archive": {"type": "file", "path": str(Path(tmp) / "out.jsonl")}},
        }))
        relay = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)], cwd=ROOT)
        try:
            time.sleep(10)  # start-up and warm-up
            cpu_start, rss_start, started = cpu_seconds(relay.pid), rss_bytes(relay.pid), time.monotonic()
            workers_start = workers_rss_bytes(relay.pid)
            samples = []
            deadline = started + args.minutes * 60
            while time.monotonic() < deadline:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                    response.read()
                samples.append(rss_bytes(relay.pid))
                time.sleep(15)
            cpu = cpu_seconds(relay.pid) - cpu_start
            elapsed = time.monotonic() - started
            rss_end = rss_bytes(relay.pid)
            workers_end = workers_rss_bytes(relay.pid)
        finally:
            relay.terminate()
            relay.wait(timeout=60)
    report.add(f"idle CPU over {args.minutes:g} min (share of one core, parse workers included)",
               cpu / elapsed * 100, "%")
    report.add("  RSS after warm-up", rss_start / 1048576, "MiB")
    report.add("  RSS at the end", rss_end / 1048576, "MiB")
    report.add("  largest RSS seen", max(samples or [rss_end]) / 1048576, "MiB")
    report.add("  parse workers' RSS after warm-up (sum)", workers_start / 1048576, "MiB")
    report.add("  parse workers' RSS at the end (sum)", workers_end / 1048576, "MiB")
    report.print()


if __name__ == "__main__":
    main()
