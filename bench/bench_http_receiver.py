"""Push receiver: entries/s accepted and request latency, 100-entry requests from concurrent clients.

The relay runs as its own process (source `http`, bearer auth, no destination: this measures intake,
which includes the journal commit each 200 waits for). The client runs in this process: `load_client`
(blocking sockets in threads, lean on the CPU the relay shares) or, with `--client httpx`, httpx on trio
(as until the fifth session: ~10 us of CPU per entry, which the relay then did not have).

    .venv/bin/python bench/bench_http_receiver.py [--requests 2000] [--concurrency 1,16] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import trio
import yaml

from bench_peer import TOKEN as HEC_TOKEN
from bench_peer import start_receiver, stats
from common import ROOT, Report, cpu_seconds, peak_rss_bytes
from load_client import post_all
from relay_plugins.demo import DemoSource
from tests.helpers import free_port

TOKEN = "bench-token-0123456789abcdef"
PER_REQUEST = 100


def bodies(requests: int, *, compress: bool) -> list[bytes]:
    source = DemoSource.__new__(DemoSource)
    trio.run(source.open)
    rng = random.Random(20240514)
    out = []
    for _ in range(requests):
        body = orjson.dumps([source.make_entry(rng) for _ in range(PER_REQUEST)])
        out.append(gzip.compress(body, compresslevel=1) if compress else body)
    return out


def request_headers(compress: bool) -> dict[str, str]:
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    if compress:
        headers["content-encoding"] = "gzip"
    return headers


async def push(url: str, payloads: list[bytes], concurrency: int, compress: bool,
               rate: float | None = None) -> tuple[float, list[float], int]:
    """Send every payload; closed loop (as fast as answers come), or open loop at `rate` requests/s."""
    latencies: list[float] = []
    accepted = 0
    queue = list(reversed(payloads))
    headers = request_headers(compress)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:
        start_time = trio.current_time()
        sent = 0

        async def worker() -> None:
            nonlocal accepted, sent
            while queue:
                body = queue.pop()
                if rate is not None:  # open loop: request i goes out at i / rate, whatever the answers do
                    sent += 1
                    await trio.sleep_until(start_time + sent / rate)
                started = time.perf_counter()
                response = await client.post(url, content=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise SystemExit(f"receiver answered {response.status_code}: {response.text}")
                accepted += response.json()["accepted"]

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - started
    return elapsed, latencies, accepted


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def push_lean(port: int, payloads: list[bytes], concurrency: int, compress: bool,
              rate: float | None = None) -> tuple[float, list[float], int]:
    outcome = post_all("127.0.0.1", port, "/v1/entries", request_headers(compress), payloads, concurrency, rate)
    if outcome.errors:
        raise SystemExit(f"receiver answered {outcome.errors[0]} ({len(outcome.errors)} errors)")
    return outcome.elapsed, outcome.latencies, outcome.accepted


def run(report: Report, requests: int, concurrency: int, compress: bool, hec: bool = False,
        rate: float | None = None, parse_workers: str | int = "auto", client: str = "lean") -> float:
    payloads = bodies(requests, compress=compress)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = Path(tmp) / "relay.yaml"
        destinations = {}
        receiver = None
        if hec:
            receiver, hec_url, _ = start_receiver(Path(tmp))
            destinations = {"splunk": {"type": "splunk_hec", "url": hec_url, "token": HEC_TOKEN,
                                       "compression": "none"}}
        config.write_text(yaml.safe_dump({
            "state_dir": str(Path(tmp) / "state"), "log": {"format": "json", "level": "warning"},
            "metrics": {"listen": None}, "parse_workers": parse_workers,
            "sources": {"push": {"type": "http", "listen": f"127.0.0.1:{port}", "auth": {"bearer_tokens": [TOKEN]}}},
            "destinations": destinations,
        }))
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)], cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}/v1/entries"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the relay did not start")
                time.sleep(0.1)
            cpu_before, client_before = cpu_seconds(proc.pid), time.process_time()
            wall_start = time.time()
            if client == "lean":
                elapsed, latencies, accepted = push_lean(port, payloads, concurrency, compress, rate)
            else:
                elapsed, latencies, accepted = trio.run(push, url, payloads, concurrency, compress, rate)
            client_cpu = time.process_time() - client_before
            answered = elapsed
            if receiver is not None:  # end to end: until the HEC receiver has every entry
                while stats(hec_url)["events"] < accepted:
                    time.sleep(0.02)
                if rate is None:
                    elapsed = stats(hec_url)["last_event_at"] - wall_start
            cpu = cpu_seconds(proc.pid) - cpu_before
            rss = peak_rss_bytes(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            if receiver is not None:
                receiver.terminate()
                receiver.wait(timeout=30)
    label = f"{concurrency} client{'s' * (concurrency > 1)}{', gzip' if compress else ''}"
    label += " -> splunk_hec" if hec else ""
    label += f", open loop at {rate * PER_REQUEST:,.0f} entries/s" if rate else ""
    report.add(f"accepted, {label}", accepted / elapsed, "entries/s")
    if hec and rate is None:
        report.add(f"  answered (journaled), {label}", accepted / answered, "entries/s")
    report.add(f"  request latency p50, {label}", percentile(latencies, 0.50) * 1000, "ms")
    report.add(f"  request latency p99, {label}", percentile(latencies, 0.99) * 1000, "ms")
    report.add(f"  relay CPU per entry, {label}", cpu / accepted * 1e6, "us")
    report.add(f"  relay peak RSS, {label}", rss / 1048576, "MiB")
    report.add(f"  load client CPU per entry, {label}", client_cpu / accepted * 1e6, "us")
    return accepted / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000, help="requests per run (100 entries each)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts")
    parser.add_argument("--gzip", action="store_true", help="also a run with gzip bodies")
    parser.add_argument("--hec", action="store_true",
                        help="end to end into splunk_hec, then p99 at half of that rate (the issue-9 figure)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--parse-workers", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="the relay's parse_workers setting (default: auto)")
    parser.add_argument("--client", choices=("lean", "httpx"), default="lean",
                        help="the load client: lean blocking sockets (default) or httpx on trio")
    args = parser.parse_args()
    report = Report("http_receiver")
    options = {"parse_workers": args.parse_workers, "client": args.client}
    if args.hec:
        top = max(int(c) for c in args.concurrency.split(","))
        full = run(report, args.requests, top, compress=False, hec=True, **options)
        run(report, args.requests, top, compress=False, hec=True, rate=full / 2 / PER_REQUEST, **options)
        report.print()
        return
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        run(report, args.requests, concurrency, compress=False, **options)
    if args.gzip:
        run(report, args.requests, max(int(c) for c in args.concurrency.split(",")), compress=True, **options)
    report.print()


if __name__ == "__main__":
    main()
