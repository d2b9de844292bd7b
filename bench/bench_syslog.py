"""Benchmark: entries per second from the `syslog` destination to a real syslog-ng, over TCP and TLS.

    .venv/bin/python bench/bench_syslog.py [--entries 100000] [--batch 1000] [--concurrency 16] [--json]

Drives the destination the way the delivery loop does (one `send()` per batch, `concurrency` at once;
with `confirm_after: 0` one at a time, as the type's default then is) with real incident.io-shaped entries
from the catalog, and stops the clock when syslog-ng has written the last message to its file, so the
figure is entries the receiver really got. syslog-ng writes
`${RAWMSG}` only, to keep the receiver from being the bottleneck; it runs on the same machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import orjson
import trio
import trustme

import relay
from common import Report
from relay.catalog import load_catalog
from relay.logs import configure_logging
from relay_plugins.syslog import SyslogDestination, SyslogSettings
from tests.syslog_receiver import SYSLOG_NG, SyslogNg, TlsFiles


def make_batches(total: int, size: int) -> list[relay.Batch]:
    examples = [orjson.dumps(t["example"]) for t in load_catalog()["entry_types"]]
    entries = []
    for seq in range(1, total + 1):
        data = examples[seq % len(examples)]
        entries.append(relay.Entry(seq, data, 1_715_679_000.0 + seq / 1000, orjson.loads(data)["action"]))
    return [relay.Batch("bench", entries[i].seq, entries[min(i + size, total) - 1].seq, entries[i:i + size])
            for i in range(0, total, size)]


async def run_one(receiver: SyslogNg, settings: dict[str, object], batches: list[relay.Batch],
                  concurrency: int, workdir: Path) -> tuple[float, int]:
    """Seconds from the first send until syslog-ng has written every message, and bytes sent."""
    destination = SyslogDestination(relay.Context("bench", "destination", workdir),
                                    SyslogSettings.model_validate(settings))
    await destination.open()
    total = sum(len(b) for b in batches)
    before = receiver.lines()
    try:
        await destination.check()  # connect (and handshake) outside the timed part
        slots = trio.Semaphore(concurrency)
        started = time.perf_counter()

        async def deliver(batch: relay.Batch) -> None:
            try:
                result = await destination.send(batch)
                if result != relay.Delivered():
                    raise RuntimeError(f"batch {batch.id}: {result}")
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for batch in batches:
                await slots.acquire()
                nursery.start_soon(deliver, batch)
        while receiver.lines() - before < total:  # noqa: ASYNC110 - another process writes the file
            await trio.sleep(0.005)
        elapsed = time.perf_counter() - started
    finally:
        await destination.close()
    return elapsed, sum(len(e.data) for b in batches for e in b.entries)


async def main(args: argparse.Namespace, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-syslog-") as tmp:
        work = Path(tmp)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1")
        server.private_key_pem.write_to_path(str(work / "key.pem"))
        server.cert_chain_pems[0].write_to_path(str(work / "cert.pem"))
        ca.cert_pem.write_to_path(str(work / "ca.pem"))
        receiver = SyslogNg(work / "syslog-ng", TlsFiles(work / "cert.pem", work / "key.pem"), raw_only=True)
        await receiver.start()
        batches = make_batches(args.entries, args.batch)
        common = {"host": "127.0.0.1", "hostname": "bench.example"}
        tcp = {**common, "port": receiver.ports["tcp"]}
        tls = {**common, "port": receiver.ports["tls"], "transport": "tls", "tls": {"ca_file": str(work / "ca.pem")}}
        runs = {  # the defaults, and confirm_after: 0 (acknowledgements only) to show what the wire takes
            "tcp": (tcp, args.concurrency), "tcp_confirm_after_0": ({**tcp, "confirm_after": 0}, 1),
            "tls": (tls, args.concurrency), "tls_confirm_after_0": ({**tls, "confirm_after": 0}, 1),
        }
        try:
            for name, (settings, concurrency) in runs.items():
                warm_up = batches[: max(1, len(batches) // 10)]
                await run_one(receiver, settings, warm_up, concurrency, work)
                elapsed, nbytes = await run_one(receiver, settings, batches, concurrency, work)
                report.add(f"{name}_entries_per_second", args.entries / elapsed, "entries/s")
                report.add(f"{name}_mib_per_second", nbytes / elapsed / 2**20, "MiB/s (entry JSON)")
        finally:
            await receiver.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=SyslogDestination.batch_defaults.max_entries,
                        help="entries per batch (default: the type's)")
    parser.add_argument("--concurrency", type=int, default=SyslogDestination.concurrency_default,
                        help="batches in flight with confirm_after (default: the type's)")
    parser.add_argument("--json", action="store_true", help="one JSON object per figure per line")
    args = parser.parse_args()
    if SYSLOG_NG is None:
        sys.exit("syslog-ng is not installed (Debian: apt-get install syslog-ng-core)")
    configure_logging("warning", "json", stream=sys.stderr)
    report = Report("syslog")
    trio.run(main, args, report)
    report.print()


if __name__ == "__main__":
    cli()
