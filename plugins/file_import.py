"""Source `file`: import an export file once (JSON lines, a JSON array, or CSV), resumably.

Each chunk of entries is committed together with the byte offset after it, so a restart resumes exactly
there; the last chunk's commit also records that the file is done, so a restart does not import it again.
The file is recognised by a fingerprint of its first 64 KiB: a different file at the same path is
imported from its start (entries already journaled are counted as duplicates). `run()` returns when the
file is done. `relay import --config C --source NAME FILE` runs the same code once from the shell.

Unreadable records (a line that is not JSON, a CSV row with a broken JSON cell) are quarantined with the
record number and byte offset, and the import goes on. A JSON array broken beyond repair stops the import
at the last good item with an error; fix the file and start again to continue from there.

Metrics (label `source`):
    audit_relay_file_import_read_bytes      how far into the file the import has committed
    audit_relay_file_import_size_bytes      the file's size
    audit_relay_file_import_finished        1 once the whole file is imported
Log events: `file_import_started`, `file_import_resumed`, `file_import_restarted` (a different file),
`file_import_already_done`, `file_import_finished`, `file_import_failed` (error, with byte offset).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import orjson
import trio
from pydantic import Field

import relay
from relay.importer import ImportProgress
from relay.workers import Workers

from .file_formats import (
    BLOCK,
    FIRST_BLOCK,
    Block,
    Chunk,
    CsvReader,
    Format,
    JsonlReader,
    detect,
    open_reader,
    prepare_chunk,
    prepare_jsonl,
)

FINGERPRINT_BYTES = 64 * 1024
REQUIRED_COLUMNS = ("action", "occurred_at", "actor.type", "actor.id")


class FileImportSettings(relay.Settings):
    path: Path
    """The file to import."""
    format: Literal["auto", "jsonl", "json", "csv"] = "auto"
    """`auto`: by extension (.jsonl/.ndjson, .csv), else by the first character (`[` JSON array, `{` JSON lines)."""
    chunk_entries: int = Field(default=10_000, gt=0, le=100_000)
    """Entries committed per journal transaction (with the offset after them). Each commit rewrites the pages
    of the dedupe index its entries' (random) keys land in, so larger chunks import faster into a large
    journal: 200,000 entries into one holding 1.2 million took 8.2 s in chunks of 2,000, 5.7 s in 10,000."""
    csv_delimiter: str = Field(default=",", min_length=1, max_length=1)


@dataclass(frozen=True)
class Mark:
    """The cursor: which file, how far, and whether it is done."""

    file: str
    fingerprint: str
    format: Format
    offset: int = 0
    records: int = 0
    done: bool = False
    error: str | None = None

    def encode(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def decode(cls, text: str | None) -> Mark | None:
        if not text:
            return None
        try:
            mark = cls(**orjson.loads(text))
        except (orjson.JSONDecodeError, TypeError):
            return None
        return mark if mark.format in ("jsonl", "json", "csv") else None


class ImportBusy(relay.RelayError):
    """Another process is importing under the same source name."""


def _fingerprint(f: BinaryIO) -> tuple[str, bytes, int]:
    f.seek(0)
    head = f.read(FINGERPRINT_BYTES)
    size = os.fstat(f.fileno()).st_size
    return hashlib.sha256(head).hexdigest()[:32], head, size


class _Chunks:
    """The chunks of one read, possibly still being prepared by a worker process."""

    def __init__(self) -> None:
        self._ready = trio.Event()
        self._chunks: list[Chunk] = []

    def set(self, chunks: list[Chunk]) -> None:
        self._chunks = chunks
        self._ready.set()

    async def prepare(self, workers: Workers, block: Block, limit: int, name: str) -> None:
        self.set(await workers.run(prepare_jsonl, block, limit, name))

    async def get(self) -> list[Chunk]:
        await self._ready.wait()
        return self._chunks


class FileImportSource(relay.Source):
    type_name = "file"
    Settings = FileImportSettings
    parses_in_workers = True
    settings: FileImportSettings

    def __init__(self, context: relay.Context, settings: FileImportSettings) -> None:
        super().__init__(context, settings)
        self.progress = ImportProgress()
        self._m_read = context.gauge("file_import_read_bytes", "How far into the file the import has committed.")
        self._m_size = context.gauge("file_import_size_bytes", "Size of the file being imported.")
        self._m_finished = context.gauge("file_import_finished", "1 once the whole file is imported.")

    def _lock(self) -> int:
        path = self.context.state_dir / f"{self.name}.import.lock"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ImportBusy(f"another process is importing as source {self.name!r} (lock {path})") from None
        return fd

    async def run(self, intake: relay.Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        lock = await trio.to_thread.run_sync(self._lock)
        try:
            f = await trio.to_thread.run_sync(open, self.settings.path, "rb")
            try:
                await self._import(intake, f)
            finally:
                f.close()
        finally:
            os.close(lock)

    async def _import(self, intake: relay.Intake, f: BinaryIO) -> None:
        path = str(self.settings.path)
        fingerprint, head, size = await trio.to_thread.run_sync(_fingerprint, f)
        self.progress.total_bytes = size
        self._m_size.set(size)
        mark = Mark.decode(intake.cursor)
        if mark is not None and mark.fingerprint == fingerprint:
            self.progress.done_bytes, self.progress.records = mark.offset, mark.records
            if mark.done:
                self.log.info("file_import_already_done", file=path, records=mark.records,
                              hint="a file with different content at this path would be imported")
                self.progress.already_done = True
                self._finished(mark)
                return
            self.log.info("file_import_resumed", file=path, format=mark.format, offset=mark.offset,
                          records=mark.records)
        else:
            if mark is not None:
                self.log.warning("file_import_restarted", file=path, previous=mark.file,
                                 hint="the file differs from the one imported before; importing it from its start "
                                      "(entries already in the journal count as duplicates)")
            fmt: Format = detect(head, path) if self.settings.format == "auto" else self.settings.format
            mark = Mark(path, fingerprint, fmt)
            self.log.info("file_import_started", file=path, format=fmt, size=size)
        reader = await trio.to_thread.run_sync(open_reader, mark.format, f, mark.offset, mark.records,
                                               self.settings.csv_delimiter)
        # JSON lines are parsed and validated by worker processes, a block at a time, up to one block per
        # worker ahead of the commits (in order); other formats (and a line longer than a block) are read
        # here, in a thread.
        send, receive = trio.open_memory_channel[_Chunks](self.context.workers.count)
        async with trio.open_nursery() as nursery:
            async def produce() -> None:
                size = FIRST_BLOCK
                async with send:
                    while True:
                        chunks = _Chunks()
                        block = None
                        if isinstance(reader, JsonlReader):
                            block = await trio.to_thread.run_sync(reader.read_block, size)
                            size = min(2 * size, BLOCK)
                        if block is not None:
                            nursery.start_soon(chunks.prepare, self.context.workers, block,
                                               self.settings.chunk_entries, self.settings.path.name)
                            last = block.at_end
                        else:
                            chunk = await trio.to_thread.run_sync(reader.read, self.settings.chunk_entries)
                            chunks.set([prepare_chunk(chunk, self.settings.path.name)])
                            last = chunk.done or chunk.error is not None
                        await send.send(chunks)
                        if last:
                            return
            nursery.start_soon(produce)
            async with receive:
                async for chunks in receive:
                    for chunk in await chunks.get():
                        mark = Mark(path, fingerprint, mark.format, chunk.offset, chunk.records, chunk.done,
                                    chunk.error)
                        await self._commit(intake, chunk, mark)
        if mark.error:
            self.progress.error = mark.error
            self.log.error("file_import_failed", file=path, offset=mark.offset, records=mark.records,
                           error=mark.error, hint="entries before this point are imported; fix the file and "
                                                  "restart to continue from here")
        else:
            self.log.info("file_import_finished", file=path, records=mark.records, accepted=self.progress.accepted,
                          duplicates=self.progress.duplicates, quarantined=self.progress.quarantined)
            self._finished(mark)

    def _finished(self, mark: Mark) -> None:
        self.progress.finished = True
        self.progress.done_bytes = self.progress.total_bytes
        self._m_read.set(mark.offset)
        self._m_finished.set(1)

    async def _commit(self, intake: relay.Intake, chunk: Chunk, mark: Mark) -> None:
        """Quarantine the chunk's unreadable records, then journal its entries with the new mark."""
        name = self.settings.path.name
        pending = list(chunk.bad)
        while True:
            try:
                if pending:
                    async with trio.open_nursery() as nursery:  # concurrent: one group commit for all
                        for raw, reason in pending:
                            nursery.start_soon(intake.quarantine, raw, f"{name}: {reason}")
                    self.progress.quarantined += len(pending)
                    pending = []
                assert chunk.prepared is not None, "every chunk is prepared before it is committed"
                result = await intake.submit_prepared(chunk.prepared, cursor=mark.encode())
                break
            except relay.JournalUnavailable as exc:
                await self._wait(intake, exc)
            except BaseExceptionGroup as group:
                unavailable = group.subgroup(relay.JournalUnavailable)
                if unavailable is None or group.subgroup(lambda e: not isinstance(e, relay.JournalUnavailable)):
                    raise
                await self._wait(intake, unavailable.exceptions[0])  # type: ignore[arg-type]
        self.progress.accepted += result.accepted
        self.progress.duplicates += result.duplicates
        self.progress.quarantined += result.quarantined
        self.progress.records = mark.records
        self.progress.done_bytes = mark.offset
        self._m_read.set(mark.offset)

    @staticmethod
    async def _wait(intake: relay.Intake, exc: relay.JournalUnavailable) -> None:
        await intake.wait_writable()
        if not intake.writable:
            await trio.sleep(exc.retry_after)

    async def check(self) -> str:
        def inspect() -> str:
            with open(self.settings.path, "rb") as f:
                _, head, size = _fingerprint(f)
                fmt = detect(head, str(self.settings.path)) if self.settings.format == "auto" else self.settings.format
                if fmt == "csv":
                    header = CsvReader(f, 0, 0, self.settings.csv_delimiter).header
                    missing = [c for c in REQUIRED_COLUMNS if c not in header]
                    if missing:
                        raise relay.CheckFailed(f"the CSV header has no column {', '.join(missing)} "
                                                f"(columns: {', '.join(header[:20])})")
                return f"{self.settings.path}: {fmt}, {size:,} bytes"

        try:
            return await trio.to_thread.run_sync(inspect)
        except OSError as exc:
            raise relay.CheckFailed(f"cannot read {self.settings.path}: {exc.strerror}") from None


@relay.hookimpl
def register_source_types(register):  # type: ignore[no-untyped-def]
    register(FileImportSource)
