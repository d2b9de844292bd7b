"""Engine benchmarks: the journal's raw insert rate; demo -> journal -> file and file import -> journal ->
file end to end; and the import and the `file` destination each alone, with what their CPU allows together.

    .venv/bin/python bench/bench_engine.py [--n 100000] [--data FILE] [--growth 1000000] [--json]
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
import yaml

from common import ROOT, Report, cpu_seconds, peak_rss_bytes
from relay.entry import NewEntry, prepare
from relay.intake import JournalIntake
from relay.journal import Journal
from relay_plugins.demo import DemoSource


def make_entries(n: int) -> list[dict[str, object]]:
    source = DemoSource.__new__(DemoSource)
    trio.run(source.open)
    rng = random.Random(20240514)
    return [source.make_entry(rng) for _ in range(n)]


async def journal_rates(entries: list[dict[str, object]], report: Report) -> None:
    prepared = [prepare(e) for e in entries]
    for label, chunk, writers, validate in (("append, 1 writer x 1000-entry chunks", 1000, 1, False),
                                            ("append, 8 writers x 100-entry chunks", 100, 8, False),
                                            ("submit (validate + append), 8 writers x 100", 100, 8, True)):
        with tempfile.TemporaryDirectory() as tmp:
            journal = Journal(Path(tmp), max_size=1 << 34, retention=3600)
            await journal.open()
            intake = JournalIntake("bench", journal, None)
            chunks = [entries[i:i + chunk] if validate else prepared[i:i + chunk]
                      for i in range(0, len(entries), chunk)]
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run)
                started = time.perf_counter()

                async with trio.open_nursery() as writers_nursery:
                    for w in range(writers):
                        writers_nursery.start_soon(_writer, journal, intake, chunks[w::writers], validate)
                elapsed = time.perf_counter() - started
                nursery.cancel_scope.cancel()
            await journal.close()
            report.add(f"journal {label}", len(entries) / elapsed, "entries/s")


async def journal_growth(prepared: list[NewEntry], report: Report) -> None:
    """Appends in 10,000-entry chunks (an import's) while the journal grows: the rate of each fifth shows
    whether it falls as the dedupe index grows."""
    n = len(prepared)
    fifths: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp), max_size=1 << 36, retention=365 * 86400)
        await journal.open()
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            started = last = time.perf_counter()
            for i in range(0, n, 10_000):
                await journal.append("bench", prepared[i:i + 10_000], (), None, keep_cursor=True)
                if (i + 10_000) % (n // 5) == 0:
                    now = time.perf_counter()
                    fifths.append(n / 5 / (now - last))
                    last = now
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        await journal.close()
    report.add(f"journal append growing to {n:,} entries, 10,000-entry chunks", n / elapsed, "entries/s")
    for index, rate in enumerate(fifths):
        report.add(f"  fifth {index + 1}", rate, "entries/s")


async def _writer(journal: Journal, intake: JournalIntake, chunks: list[list], validate: bool) -> None:  # type: ignore[type-arg]
    for part in chunks:
        if validate:
            await intake.submit(part)
        else:
            await journal.append("bench", part, (), None, keep_cursor=True)


def to_file(label: str, n: int, source: dict[str, object], report: Report, data: Path | None = None) -> None:
    """`relay run` with `source` and a `file` destination, timed until the file holds N lines."""
    with tempfile.TemporaryDirectory() as tmp:
        if data is not None:
            from bench_peer import write_data

            write_data(data, n)
        elapsed, cpu, rss = _run_to_file(Path(tmp), n, {"in": source})
    report.add(f"{label}, {n:,} entries (incl. start-up)", n / elapsed, "entries/s")
    report.add("  relay CPU per entry", cpu / n * 1e6, "us")
    report.add("  peak RSS", rss / 1048576, "MiB")


def import_then_drain(data: Path, n: int, report: Report) -> None:
    """The two halves of the import -> file job, one after the other: `relay import` of `data` alone (its
    CPU includes the parse workers'), then the `file` destination alone, draining that journal. Their CPU
    per entry, added, is what the whole job costs: on two cores the end-to-end rate cannot pass
    2 / (the sum) however the work overlaps."""
    from bench_backlog import relay_import

    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        relay_import(Path(tmp) / "state", data)
        imported = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the relay and its parse workers, reaped
        import_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        elapsed, drain_cpu, rss = _run_to_file(Path(tmp), n, {})
    report.add(f"relay import alone, {n:,} entries", n / imported, "entries/s")
    report.add("  import CPU per entry (incl. parse workers)", import_cpu / n * 1e6, "us")
    report.add(f"file destination alone, draining {n:,} journaled entries (incl. start-up)", n / elapsed, "entries/s")
    report.add("  relay CPU per entry", drain_cpu / n * 1e6, "us")
    report.add("  peak RSS", rss / 1048576, "MiB")
    report.add("  two-core bound for import -> file: 2 cores / (import + drain CPU per entry)",
               2 / (import_cpu + drain_cpu) * n, "entries/s")


def _run_to_file(tmp: Path, n: int, sources: dict[str, object]) -> tuple[float, float, int]:
    """`relay run` with `sources` (none: drain the journal already in `tmp/state`) and a `file` destination
    into `tmp/out.jsonl`, until the file holds N lines: (seconds, relay CPU seconds, peak RSS)."""
    out, config = tmp / "out.jsonl", tmp / "relay.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp / "state"), "log": {"format": "json", "level": "warning"},
        "metrics": {"listen": None}, "sources": sources,
        "destinations": {"out": {"type": "file", "path": str(out)}},
    }))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)], cwd=ROOT)
    lines, rss, counted = 0, 0, 0
    while lines < n:
        time.sleep(0.05)
        rss = max(rss, peak_rss_bytes(proc.pid))
        if out.exists():  # count only what is new: re-reading the whole file would compete for the CPU
            with open(out, "rb") as f:
                f.seek(counted)
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    lines += chunk.count(b"\n")
                    counted += len(chunk)
        if proc.poll() is not None:
            raise SystemExit(f"relay exited with {proc.returncode}")
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(proc.pid)
    proc.terminate()
    proc.wait(timeout=60)
    return elapsed, cpu, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--data", type=Path, help="a JSON-lines file for the import run (e.g. the peer's data set)")
    parser.add_argument("--growth", type=int, default=0, metavar="N",
                        help="also journal N entries into one journal, with the rate of each fifth (e.g. 1000000)")
    args = parser.parse_args()
    report = Report("engine")
    entries = make_entries(args.n)
    trio.run(journal_rates, entries, report)
    if args.growth:
        trio.run(journal_growth, [prepare(e) for e in make_entries(args.growth)], report)
    to_file("demo -> journal -> file", args.n, {"type": "demo", "rate": 1_000_000, "count": args.n, "seed": 1},
            report)
    if args.data is not None:
        with open(args.data, "rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        to_file(f"file import ({args.data.name}) -> journal -> file", lines, {"type": "file", "path": str(args.data)},
                report)
        import_then_drain(args.data, lines, report)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data.jsonl"
            to_file("file import -> journal -> file", args.n, {"type": "file", "path": str(data)}, report, data)
            import_then_drain(data, args.n, report)
    report.print()


if __name__ == "__main__":
    main()
