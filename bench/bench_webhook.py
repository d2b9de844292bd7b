"""Webhook destination benchmark: entries/s sent to a local receiver, per encoding, with and without gzip.

    .venv/bin/python bench/bench_webhook.py [--n 50000] [--batch 500] [--json]

The plugin's `send()` is driven directly, one batch at a time (as the delivery loop does with
`concurrency: 1`), signing every request with one secret. The receiver is a separate process (hypercorn
on trio, as the relay's own HTTP server) that reads each body and answers 200, so it shares the
machine's cores but not the relay's event loop. A last figure runs the whole relay (demo source ->
journal -> webhook -> receiver) as a subprocess.
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import trio
import yaml

from common import ROOT, Report, cpu_seconds
from relay import Batch, Context, Delivered, Entry, Rejected, asgi
from relay.context import MemoryStateStore
from relay_plugins.webhook import WebhookDestination, WebhookSettings

SECRET = "whsec_" + base64.b64encode(b"benchmark signing key, 32 bytes").decode()


# -- the receiver (a child process) ----------------------------------------------------------------------

async def _receiver_app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
    """Reads each body and answers 200; counts the entries of uncompressed NDJSON; GET says how many."""
    if scope["type"] == "lifespan":
        await asgi.lifespan(receive, send)
        return
    lines = 0
    while True:
        message = await receive()
        lines += message.get("body", b"").count(b"\n")
        if not message.get("more_body"):
            break
    if scope["method"] == "GET":
        await asgi.respond(send, 200, str(_received_entries[0]).encode())
        return
    headers = dict(scope["headers"])
    if headers.get(b"content-type", b"").startswith(b"application/x-ndjson") and b"content-encoding" not in headers:
        _received_entries[0] += lines
    await asgi.respond(send, 200, b"")


_received_entries = [0]


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(asgi.serve, _receiver_app, asgi.hypercorn_config("127.0.0.1:0"))
        print(addresses[0], flush=True)


# -- the sender -------------------------------------------------------------------------------------------

def make_entries(n: int) -> list[Entry]:
    from bench_engine import make_entries as demo_entries

    return [Entry(i + 1, orjson.dumps(value), time.time(), str(value["action"]))
            for i, value in enumerate(demo_entries(n))]


async def send_all(url: str, entries: list[Entry], batch_size: int, encoding: str, compression: str
                   ) -> tuple[float, float, int]:
    """Seconds to deliver every entry, CPU seconds the sender used (threads too), bytes of entry JSON."""
    settings = WebhookSettings.model_validate({"url": url, "encoding": encoding, "compression": compression,
                                               "signing_secrets": [SECRET]})
    with tempfile.TemporaryDirectory() as tmp:
        destination = WebhookDestination(Context("bench", "destination", Path(tmp), MemoryStateStore()), settings)
        await destination.open()
        try:
            started, cpu = time.perf_counter(), time.process_time()
            for i in range(0, len(entries), batch_size):
                part = entries[i:i + batch_size]
                while part:
                    result = await destination.send(Batch("bench", part[0].seq, part[-1].seq, part))
                    if isinstance(result, Delivered):
                        break
                    if not isinstance(result, Rejected) or result.reasons or result.resend_from is None:
                        raise SystemExit(f"the receiver did not take a batch: {result}")
                    part = part[result.resend_from:]  # progress reported (encoding json): send the rest
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            return elapsed, cpu, sum(len(e.data) for e in entries)
        finally:
            await destination.close()


def end_to_end(url: str, n: int, report: Report) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "relay.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(Path(tmp) / "state"), "log": {"format": "json", "level": "warning"},
            "metrics": {"listen": None},
            "sources": {"demo": {"type": "demo", "rate": 1_000_000, "count": n, "seed": 1}},
            "destinations": {"hook": {"type": "webhook", "url": f"{url}/e2e", "encoding": "ndjson",
                                      "signing_secrets": [SECRET]}},
        }))
        before = _received(url)
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)], cwd=ROOT)
        try:
            while _received(url) - before < n:
                if proc.poll() is not None:
                    raise SystemExit(f"the relay exited with {proc.returncode}")
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        report.add(f"demo -> journal -> webhook ndjson, {n:,} entries (incl. start-up)", n / elapsed, "entries/s")
        report.add("  relay CPU per entry", cpu / n * 1e6, "us")


def _received(url: str) -> int:
    import httpx

    return int(httpx.get(f"{url}/count").text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve)
        return
    report = Report("webhook")
    receiver = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        url = receiver.stdout.readline().strip()
        entries = make_entries(args.n)
        for encoding in ("json_array", "ndjson"):
            for compression in ("none", "gzip"):
                elapsed, cpu, size = trio.run(send_all, url, entries, args.batch, encoding, compression)
                label = f"{encoding}, gzip {'on' if compression == 'gzip' else 'off'}, {args.batch}/request"
                report.add(label, len(entries) / elapsed, "entries/s")
                report.add("  entry JSON", size / elapsed / 2**20, "MiB/s")
                report.add("  sender CPU per entry", cpu / len(entries) * 1e6, "us")
        few = entries[:min(len(entries), 2000)]
        elapsed, cpu, _ = trio.run(send_all, url, few, args.batch, "json", "none")
        report.add("json (one request per entry)", len(few) / elapsed, "entries/s")
        report.add("  sender CPU per entry", cpu / len(few) * 1e6, "us")
        end_to_end(url, args.n, report)
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
    report.print()


if __name__ == "__main__":
    main()
