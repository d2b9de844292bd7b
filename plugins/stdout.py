"""Destination `stdout`: print each entry as a JSON line on standard output (for trying things out).

Delivery counts as done once the line is flushed to the pipe; there is no stronger guarantee.
"""

from __future__ import annotations

import sys

import trio

import relay


class StdoutSettings(relay.Settings):
    pass


class StdoutDestination(relay.Destination):
    type_name = "stdout"
    Settings = StdoutSettings
    batch_defaults = relay.BatchDefaults(max_entries=1000, max_bytes=1024 * 1024, max_wait=0.1)

    def _write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    async def send(self, batch: relay.Batch) -> relay.Result:
        data = b"".join(entry.data + b"\n" for entry in batch.entries)
        try:
            await trio.to_thread.run_sync(self._write, data)
        except OSError as exc:
            return relay.RetryLater(f"writing to standard output: {exc.strerror}")
        return relay.Delivered()


@relay.hookimpl
def register_destination_types(register):  # type: ignore[no-untyped-def]
    register(StdoutDestination)
