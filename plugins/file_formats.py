"""Reading export files a chunk at a time, with the byte offset to resume from after each chunk.

Three formats: JSON lines, one JSON array (streamed, never loaded whole: files can be GBs), and CSV whose
header row names entry fields by dotted path. Every reader resumes from a byte offset it handed out
earlier, and reports input it cannot read with the record number and byte offset, so nothing is skipped
silently. Blocking file I/O: the `file` source calls these in a worker thread. No metrics or logs.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, overload

import orjson

from relay.catalog import ENTRY_FIELDS
from relay.entry import Prepared, parse_entry, prepare_batch

__all__ = ["BLOCK", "FIRST_BLOCK", "MAX_RECORD", "Block", "Chunk", "CsvReader", "Format", "JsonArrayReader",
           "JsonlReader", "Labels", "detect", "open_reader", "prepare_chunk", "prepare_jsonl"]

Format = Literal["jsonl", "json", "csv"]
MAX_RECORD = 16 * 1024 * 1024
"""A line, array item or CSV row larger than this is not an audit entry: it is quarantined (its first
64 KiB) and skipped, rather than read into memory."""
_KEEP = 64 * 1024
_AFTER_SCALAR = frozenset(" \t\r\n,]}")
_READ = 1024 * 1024
BLOCK = 4 * 1024 * 1024
"""Bytes of JSON lines per worker job (~6,400 entries of 650 bytes), so one job fills a default chunk of
10,000 entries or most of it: sending the job and its result costs little against parsing it."""
FIRST_BLOCK = 256 * 1024
"""An import's first job is this small, and each next one twice the last up to `BLOCK`: the first entries
reach the journal (and the destinations) after ~400 entries are parsed, not ~6,400 (0.1 s sooner)."""
_JSON_COLUMNS = frozenset({"actor", "targets", "context", "metadata"})
"""CSV columns (and any `*.metadata`) whose cells hold JSON text."""

csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD))


@dataclass
class Chunk:
    items: list[Any] = field(default_factory=list)
    """Parsed values, each still to pass entry validation, or `Accepted` by its fast path (`parse_entry`)."""
    origins: list[tuple[int, int, bytes]] = field(default_factory=list)
    """For each item: its record number, byte offset and raw bytes, for a quarantine record."""
    noun: str = "line"
    """What a record is in this format: `line`, `item` or `row` (for "line 12 (byte 3456)")."""
    bad: list[tuple[bytes, str]] = field(default_factory=list)
    """`(raw input, reason)` for records that could not be parsed: quarantined."""
    offset: int = 0
    """Byte offset to resume from: everything before it is in `items` or `bad` (or was in earlier chunks)."""
    records: int = 0
    """Records (lines, items, rows) consumed from the start of the file."""
    done: bool = False
    error: str | None = None
    """The rest of the file cannot be read (a JSON array broken beyond repair); `offset` is where it stops."""
    prepared: Prepared | None = None
    """The items validated (`prepare_chunk`; for JSON lines in a worker process): `items` is then empty."""


def detect(head: bytes, name: str) -> Format:
    """The format of a file from its name, else from its first non-blank character."""
    lower = name.lower()
    if lower.endswith((".jsonl", ".ndjson", ".jsonlines")):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    text = head.removeprefix(codecs.BOM_UTF8).lstrip()
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{") or not text:
        return "jsonl"
    return "csv"


class JsonlReader:
    """One JSON value per line; a line that is not JSON is quarantined and reading goes on.

    Two ways to read: `read()` parses here, a line at a time; `read_block()` hands out whole lines as bytes
    for `prepare_jsonl` to parse and validate in a worker process (the `file` source's fast path)."""

    def __init__(self, f: BinaryIO, offset: int, records: int) -> None:
        self.f = f
        self.offset = offset
        self.records = records
        f.seek(offset)

    def read(self, limit: int) -> Chunk:
        chunk = Chunk()
        while len(chunk.items) + len(chunk.bad) < limit:
            start = self.offset
            line = self.f.readline(MAX_RECORD + 1)
            if not line:
                chunk.done = True
                break
            self.offset += len(line)
            self.records += 1  # a record is a line, blank or not, so line numbers match an editor's
            if len(line) > MAX_RECORD and not line.endswith(b"\n"):
                self.offset += _skip_line(self.f)
                chunk.bad.append((line[:_KEEP], f"line {self.records} (byte {start}) is longer than "
                                                f"{MAX_RECORD} bytes; its first {_KEEP} bytes are kept"))
                continue
            _parse_line(line, start, self.records, chunk)
        chunk.offset, chunk.records = self.offset, self.records
        return chunk

    def read_block(self, size: int = BLOCK) -> Block | None:
        """The whole lines in the next `size` bytes (at the end of the file, the rest, newline or not).

        None when the next line alone is longer than `size`: read that one with `read(1)`."""
        self.f.seek(self.offset)
        data = self.f.read(size)
        at_end = len(data) < size
        if not at_end:
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                self.f.seek(self.offset)
                return None
            data = data[:cut]
        block = Block(data, self.offset, self.records, at_end)
        self.offset += len(data)
        self.records += data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        return block


@dataclass(frozen=True)
class Block:
    """Whole lines of a JSON-lines file, and where they start."""

    data: bytes
    offset: int
    records: int
    """Lines before `data`."""
    at_end: bool


def prepare_jsonl(block: Block, limit: int, name: str) -> list[Chunk]:
    """Parse and validate a block's lines, in chunks of at most `limit` records (run in a worker process).

    Each chunk carries its entries validated (`prepared`), labelled and kept raw as `JsonlReader.read()` and
    the `file` source would: "data.jsonl: line 12 (byte 4096)"."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    offset, records = block.offset, block.records
    lines = block.data.split(b"\n")  # like readline(): `\n` only (splitlines() would also split at `\r`)
    last = len(lines) - 1
    for index, line in enumerate(lines):
        if index == last and not line:
            break  # after the final newline
        if len(chunk.items) + len(chunk.bad) >= limit:
            chunk.offset, chunk.records = offset, records
            chunks.append(prepare_chunk(chunk, name))
            chunk = Chunk()
        start = offset
        offset += len(line) + (index < last)
        records += 1
        _parse_line(line, start, records, chunk)
    chunk.offset, chunk.records, chunk.done = offset, records, block.at_end
    chunks.append(prepare_chunk(chunk, name))
    return chunks


def prepare_chunk(chunk: Chunk, name: str) -> Chunk:
    """Validate a chunk's items into `chunk.prepared`: an invalid one is quarantined under its line or row
    in `name` (an index into a chunk would mean nothing to whoever fixes the file), as it was in the file."""
    raws = [raw for _, _, raw in chunk.origins]
    chunk.prepared = prepare_batch(chunk.items, Labels(name, chunk.noun, chunk.origins), raws)
    chunk.items, chunk.origins = [], []  # not sent back: the prepared batch holds what the journal needs
    return chunk


class Labels(Sequence[str]):
    """Where each item came from ("data.jsonl: line 12 (byte 4096)"), formatted only when asked: for the
    invalid ones."""

    def __init__(self, name: str, noun: str, origins: list[tuple[int, int, bytes]]) -> None:
        self._name = name
        self._noun = noun
        self._origins = origins

    def __len__(self) -> int:
        return len(self._origins)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record, start, _ = self._origins[index]
        return f"{self._name}: {self._noun} {record} (byte {start})"


def _parse_line(line: bytes, start: int, record: int, chunk: Chunk) -> None:
    text = line.strip()
    if start == 0:
        text = text.removeprefix(codecs.BOM_UTF8)
    if not text:
        return
    try:
        chunk.items.append(parse_entry(text))
    except orjson.JSONDecodeError as exc:
        where = f"line {record} (byte {start})"
        chunk.bad.append((line.rstrip(b"\r\n"), f"{where} is not valid JSON: {exc.msg} at column {exc.colno}"))
    else:
        chunk.origins.append((record, start, text))


def _skip_line(f: BinaryIO) -> int:
    skipped = 0
    while True:
        part = f.readline(_READ)
        skipped += len(part)
        if not part or part.endswith(b"\n"):
            return skipped


class _NotJson:
    """What NaN/Infinity parse to: not JSON, so the entry fails validation and is quarantined, not altered."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class JsonArrayReader:
    """The items of one top-level JSON array, parsed one at a time from a sliding text window.

    `json.JSONDecoder.raw_decode` (the C scanner) parses an item and says where it ended; an item cut off
    by the window's end is parsed again once more text is read, so memory stays around one item.
    """

    def __init__(self, f: BinaryIO, offset: int, records: int) -> None:
        self.f = f
        self.offset = offset
        """Byte offset of `self.buf[self.pos]`."""
        if records == 0:
            offset = 0  # nothing was read yet: start over, which also re-checks the opening [
        self.records = records
        self.state = "open" if offset == 0 else "separator"
        self.item_end = offset
        """Byte offset just after the last item read: where a resumed reader expects `,` or `]`."""
        self.buf = ""
        self.pos = 0
        self.eof = False
        self._want = _READ
        self._decoder = json.JSONDecoder(parse_constant=_NotJson)
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        f.seek(offset)

    def _fill(self) -> None:
        data = self.f.read(self._want)
        self.buf = self.buf[self.pos:]
        self.pos = 0
        try:
            self.buf += self._utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise _Broken(f"not UTF-8 text near byte {self.offset + len(self.buf.encode()) + exc.start}") from None
        self.eof = not data

    def _consume(self, end: int) -> None:
        self.offset += len(self.buf[self.pos:end].encode("utf-8"))
        self.pos = end

    def _next_char(self) -> str | None:
        """The next non-blank character (not consumed), reading more as needed; None at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n\ufeff":
                self._consume(self.pos + 1)
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return None
            self._fill()

    def read(self, limit: int) -> Chunk:
        chunk = Chunk()
        try:
            while len(chunk.items) + len(chunk.bad) < limit and not chunk.done:
                self._step(chunk)
        except _Broken as exc:
            chunk.error = f"{exc} (after {self.records} items)"
            chunk.offset, chunk.records = self.item_end, self.records
            return chunk
        chunk.offset, chunk.records = self.offset, self.records
        return chunk

    def _step(self, chunk: Chunk) -> None:
        char = self._next_char()
        if self.state == "end":
            if char is not None:
                raise _Broken(f"unexpected {char!r} after the array's closing ] at byte {self.offset}")
            chunk.done = True
        elif char is None:
            where = "no JSON array" if self.state == "open" else "the array is not closed with ]"
            raise _Broken(f"the file ends at byte {self.offset} but {where}")
        elif self.state == "open":
            if char != "[":
                raise _Broken(f"expected a JSON array ([) at byte {self.offset}, found {char!r}")
            self._consume(self.pos + 1)
            self.state = "first"
        elif self.state == "separator" or (self.state == "first" and char == "]"):
            if char == "]":
                self._consume(self.pos + 1)
                self.state = "end"
            elif char == ",":
                self._consume(self.pos + 1)
                self.state = "item"
            else:
                raise _Broken(f"expected , or ] at byte {self.offset}, found {char!r}")
        else:
            self._item(chunk)

    def _item(self, chunk: Chunk) -> None:
        while True:
            try:
                value, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise _Broken(f"item {self.records + 1} (byte {self.offset}) is not valid JSON: {exc.msg}"
                                  ) from None
                if len(self.buf) - self.pos > MAX_RECORD:
                    raise _Broken(f"item {self.records + 1} (byte {self.offset}) is larger than {MAX_RECORD} bytes"
                                  ) from None
                self._want = min(self._want * 2, MAX_RECORD)  # an item longer than the window: read more
                self._fill()
                continue
            if not self.eof and (end == len(self.buf) or (not isinstance(value, dict | list | str)
                                                          and self.buf[end] not in _AFTER_SCALAR)):
                self._fill()  # a number or literal cut off by the window (`-1` of `-1.5e10`): read on
                continue
            break
        self.records += 1
        start = self.offset
        raw = self.buf[self.pos:end].encode("utf-8")
        self.offset += len(raw)
        self.pos = end
        self.item_end = self.offset
        self._want = _READ
        chunk.items.append(value)
        chunk.noun = "item"
        chunk.origins.append((self.records, start, raw))
        self.state = "separator"


class _Broken(Exception):
    """The rest of a JSON array file cannot be read."""


class CsvReader:
    """Rows of a CSV file whose header names entry fields by dotted path (`actor.id`, `context.location`).

    `targets`, `metadata`, `actor`, `context` and `*.metadata` cells hold JSON text; `version` becomes a
    number; empty cells are left out; columns that are not entry fields are kept under `extra`.
    """

    def __init__(self, f: BinaryIO, offset: int, records: int, delimiter: str = ",") -> None:
        self.f = f
        self.records = records
        self._row_raw: list[bytes] = []
        f.seek(0)
        self.offset = 0
        header_rows = csv.reader(self._lines(), delimiter=delimiter)
        header = next(header_rows, None)
        self.header = [name.strip().removeprefix("\ufeff") for name in header or []]
        if offset > self.offset:
            f.seek(offset)
            self.offset = offset
        self._rows = csv.reader(self._lines(), delimiter=delimiter)

    def _lines(self) -> Iterator[str]:
        while True:
            line = self.f.readline(MAX_RECORD + 1)
            if not line:
                return
            self.offset += len(line)
            self._row_raw.append(line[:_KEEP] if len(line) > MAX_RECORD else line)
            yield line.decode("utf-8", "surrogateescape")

    def read(self, limit: int) -> Chunk:
        chunk = Chunk()
        while len(chunk.items) + len(chunk.bad) < limit:
            start = self.offset
            self._row_raw = []
            try:
                row = next(self._rows, None)
            except csv.Error as exc:
                self.records += 1
                chunk.bad.append((b"".join(self._row_raw), f"row {self.records} (byte {start}): {exc}"))
                continue
            if row is None:
                chunk.done = True
                break
            if not any(cell.strip() for cell in row):
                continue
            self.records += 1
            raw = b"".join(self._row_raw).rstrip(b"\r\n")
            try:
                chunk.items.append(self.entry(row))
            except ValueError as exc:
                chunk.bad.append((raw, f"row {self.records} (byte {start}): {exc}"))
            else:
                chunk.noun = "row"
                chunk.origins.append((self.records, start, raw))
        chunk.offset, chunk.records = self.offset, self.records
        return chunk

    def entry(self, row: list[str]) -> dict[str, Any]:
        if len(row) > len(self.header):
            raise ValueError(f"{len(row)} cells but the header names {len(self.header)} columns")
        entry: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for name, cell in zip(self.header, row, strict=False):
            if cell == "":
                continue
            try:
                cell.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"column {name!r} is not UTF-8 text") from None
            path = name.split(".")
            if path[0] not in ENTRY_FIELDS or not all(path):
                extra[name] = cell
                continue
            value: Any = cell
            if name in _JSON_COLUMNS or path[-1] == "metadata":
                try:
                    value = orjson.loads(cell)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"column {name!r} should hold JSON text: {exc.msg}") from None
            elif name == "version" and cell.strip().isdigit():
                value = int(cell)
            _set(entry, path, value, name)
        if extra:
            entry["extra"] = extra
        return entry


def _set(target: dict[str, Any], path: list[str], value: Any, column: str) -> None:
    for part in path[:-1]:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"column {column!r} conflicts with another column that sets {part!r}")
        target = child
    if path[-1] in target:
        raise ValueError(f"column {column!r} conflicts with another column for the same field")
    target[path[-1]] = value


def open_reader(fmt: Format, f: BinaryIO, offset: int, records: int,
                delimiter: str = ",") -> JsonlReader | JsonArrayReader | CsvReader:
    if fmt == "jsonl":
        return JsonlReader(f, offset, records)
    if fmt == "json":
        return JsonArrayReader(f, offset, records)
    return CsvReader(f, offset, records, delimiter)
