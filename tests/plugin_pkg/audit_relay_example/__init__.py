"""Destination `batch_files`: one file per batch, named by the batch's stable id (so a re-send overwrites
the same file instead of duplicating it). A complete third-party destination in under 50 lines."""

from __future__ import annotations

import os
from pathlib import Path

import trio

import relay


class BatchFilesSettings(relay.Settings):
    directory: Path
    fail_first: int = 0
    """Answer RetryLater this many times first (lets the tests see retries through a real plugin)."""


class BatchFiles(relay.Destination):
    type_name = "batch_files"
    Settings = BatchFilesSettings
    batch_defaults = relay.BatchDefaults(max_entries=100, max_wait=0.1)
    settings: BatchFilesSettings

    async def open(self) -> None:
        self.failures_left = self.settings.fail_first
        self.settings.directory.mkdir(parents=True, exist_ok=True)

    async def send(self, batch: relay.Batch) -> relay.Result:
        if self.failures_left > 0:
            self.failures_left -= 1
            return relay.RetryLater("configured to fail first")
        target = self.settings.directory / f"{batch.id}.jsonl"
        data = b"".join(e.data + b"\n" for e in batch.entries)
        await trio.to_thread.run_sync(_write_atomically, target, data)
        return relay.Delivered()


def _write_atomically(target: Path, data: bytes) -> None:
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


@relay.hookimpl
def register_destination_types(register):  # type: ignore[no-untyped-def]
    register(BatchFiles)
