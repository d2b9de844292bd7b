"""Operational benchmarks: `relay replay`'s copy rate, the cost of a /metrics scrape, and how long a reload
takes while entries flow (and that it loses none).

    .venv/bin/python bench/bench_ops.py [--n 100000] [--json]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import trio
from prometheus_client import generate_latest

from common import Report
from relay import metrics
from relay.config import parse_config
from relay.delivery import DestinationSnapshot
from relay.entry import prepare
from relay.journal import Journal
from relay.logs import configure_logging
from relay.plugins import load_registry
from relay.replay import plan_replay, replay
from relay.service import Service
from relay_plugins.demo import DemoSource


async def fill_journal(state_dir: Path, n: int) -> None:
    source = DemoSource.__new__(DemoSource)
    await source.open()
    rng = random.Random(8)
    journal = Journal(state_dir, max_size=1 << 34, retention=3600)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.register_destination("siem", "oldest")
        for start in range(0, n, 1000):
            batch = [prepare(source.make_entry(rng)) for _ in range(min(1000, n - start))]
            await journal.append("demo", batch, [], None, keep_cursor=True)
        nursery.cancel_scope.cancel()
    await journal.close()


def bench_replay(n: int, report: Report) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        trio.run(fill_journal, state, n)
        plan = plan_replay(state, "siem", 0, time.time() + 60)
        started = time.perf_counter()
        copied = replay(state, plan)
        elapsed = time.perf_counter() - started
        assert copied == n, (copied, n)
        report.add(f"replay: copy {n:,} entries to one destination", n / elapsed, "entries/s")


def bench_scrape(report: Report, destinations: int = 50, rounds: int = 200) -> None:
    now = time.time()
    snapshots = [DestinationSnapshot(f"dest-{i}", "webhook", "up", None, 1000, 10, 1, now, now - 5, now - 1, 0)
                 for i in range(destinations)]
    sources = [metrics.SourceSnapshot(f"src-{i}", True, now) for i in range(10)]
    journal = type("Stats", (), {"used_bytes": 1 << 20, "max_size": 1 << 30, "full": False, "disk_full": False,
                                 "last_seq": 10_000})()

    def provider() -> list[metrics.Metric]:
        return metrics.relay_gauges(journal, snapshots, sources)  # type: ignore[arg-type]

    metrics.SNAPSHOTS.add(provider)
    try:
        body = generate_latest(metrics.REGISTRY)
        started = time.perf_counter()
        for _ in range(rounds):
            generate_latest(metrics.REGISTRY)
        elapsed = time.perf_counter() - started
    finally:
        metrics.SNAPSHOTS.remove(provider)
    report.add(f"/metrics render, {destinations} destinations + 10 sources", elapsed / rounds * 1000, "ms")
    report.add("/metrics body size", len(body) / 1024, "KiB")


def _config(tmp: Path, variant: int, destinations: int) -> str:
    dests = "".join(f"  out{i}:\n    type: file\n    path: {tmp}/out{i}.jsonl\n"
                    f"    batch: {{max_entries: {500 + (variant if i == 0 else 0)}}}\n" for i in range(destinations))
    return (f"state_dir: {tmp}/state\nmetrics: {{listen: null}}\nlog: {{level: warning, format: json}}\n"
            f"sources:\n  demo:\n    type: demo\n    rate: 2000\ndestinations:\n{dests}")


def bench_reload(report: Report, reloads: int = 10, destinations: int = 5) -> None:
    registry = load_registry()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        def load(variant: int) -> object:
            return parse_config(_config(tmp, variant, destinations), "bench.yaml", registry, {})

        service = Service(load(0))  # type: ignore[arg-type]
        durations: list[float] = []

        async def main() -> None:
            stop, ready = trio.Event(), trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: service.run(stop, on_ready=lambda _: ready.set()))
                await ready.wait()
                for variant in range(1, reloads + 1):
                    await trio.sleep(0.3)
                    started = time.perf_counter()
                    outcome = await service.reload(load(variant))  # type: ignore[arg-type]
                    durations.append(time.perf_counter() - started)
                    assert outcome.result == "applied", outcome
                await trio.sleep(0.5)
                stop.set()

        trio.run(main)
        produced = sum(1 for _ in (tmp / "out1.jsonl").open("rb"))
        reloaded = sum(1 for _ in (tmp / "out0.jsonl").open("rb"))
    report.add(f"reload changing 1 of {destinations} destinations, demo at 2000/s (median)",
               sorted(durations)[len(durations) // 2] * 1000, "ms")
    report.add("entries missing at the reloaded destination vs an untouched one", max(0, produced - reloaded),
               "entries")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging("warning", "json", stream=sys.stderr)
    report = Report("ops")
    bench_replay(args.n, report)
    bench_scrape(report)
    bench_reload(report)
    report.print()


if __name__ == "__main__":
    main()
