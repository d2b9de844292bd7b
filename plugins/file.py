"""Destination `file`: append entries as JSON lines to a local file, fsynced before success.

Metrics: the delivery loop's `audit_relay_destination_*` series. Logs: `file_tail_repaired` when a line
cut short by a crash is removed at start-up (its batch is sent again), `file_reopened` after rotation.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import trio

import relay

_PERMANENT = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT}


class FileSettings(relay.Settings):
    path: Path
    """File to append to; created (with its folder) if missing. Safe to rotate: moved files are reopened."""
    fsync: bool = True
    """fsync after every batch, so a delivered entry survives a power cut."""


class FileDestination(relay.Destination):
    type_name = "file"
    Settings = FileSettings
    batch_defaults = relay.BatchDefaults(max_entries=5000, max_bytes=4 * 1024 * 1024, max_wait=0.2)
    settings: FileSettings

    _fd: int | None = None

    async def open(self) -> None:
        await trio.to_thread.run_sync(self._open)

    def _open(self) -> None:
        path = self.settings.path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Cut a last line left unfinished by a crash mid-write; that batch was never reported delivered."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.settings.path, "rb") as f:
            pos = size
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                if pos == size and chunk.endswith(b"\n"):
                    return
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    pos = pos - step + cut + 1
                    break
                pos -= step
        os.truncate(self.settings.path, pos)
        self.log.warning("file_tail_repaired", path=str(self.settings.path), removed_bytes=size - pos)

    def _write(self, data: bytes) -> None:
        if self._fd is None or self._rotated():
            if self._fd is not None:
                os.close(self._fd)
                self.log.info("file_reopened", path=str(self.settings.path))
            self._open()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        if self.settings.fsync:
            os.fsync(self._fd)

    def _rotated(self) -> bool:
        assert self._fd is not None
        try:
            return os.stat(self.settings.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return True

    async def send(self, batch: relay.Batch) -> relay.Result:
        data = b"".join(entry.data + b"\n" for entry in batch.entries)
        try:
            await trio.to_thread.run_sync(self._write, data)
        except OSError as exc:
            reason = f"writing {self.settings.path}: {exc.strerror}"
            return relay.Halted(reason) if exc.errno in _PERMANENT else relay.RetryLater(reason)
        return relay.Delivered()

    async def check(self) -> str:
        await trio.to_thread.run_sync(self._open)
        return f"{self.settings.path} is writable"

    async def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


@relay.hookimpl
def register_destination_types(register):  # type: ignore[no-untyped-def]
    register(FileDestination)
