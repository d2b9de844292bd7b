"""Turning a pushed HTTP body into audit entries: bounded gzip, then a JSON entry, array, envelope or NDJSON.

No I/O here: the receiver feeds the body in chunk by chunk and gets either the parsed entries or a
`BodyError` naming what is wrong and where (line, column, byte offset). That message becomes the 400
answer and the quarantine reason, so a sender and an operator both see the same explanation.
No metrics or log events of its own.
"""

from __future__ import annotations

import zlib
from typing import Any

import msgspec
import orjson

from relay.entry import Prepared, loads, parse_entry, prepare_batch

__all__ = ["NDJSON_TYPES", "BodyCollector", "BodyError", "BodyTooLarge", "inflate", "parse_entries",
           "prepare_body"]

NDJSON_TYPES = frozenset({
    "application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonl",
    "application/jsonlines", "application/x-jsonlines", "application/json-lines",
})
"""Content types that mean one JSON value per line, whatever the first line looks like."""

ENVELOPE_MEMBERS = ("data", "events")
_GZIP = zlib.MAX_WBITS | 16
_BOM = b"\xef\xbb\xbf"


class BodyError(Exception):
    """The body cannot be turned into entries; `status` is the HTTP answer (400 unless said otherwise)."""

    status = 400

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BodyTooLarge(BodyError):
    status = 413


class BodyCollector:
    """Gathers a request body as it arrives, never holding more than `limit` bytes.

    `finish()` inflates a gzip body with the same bound on its output, so neither a long upload nor a gzip
    bomb takes more than `limit` bytes of memory: crossing it raises `BodyTooLarge`. The raw bytes stay
    available for a signature check and for quarantine.
    """

    def __init__(self, limit: int, *, gzip: bool = False) -> None:
        self.limit = limit
        self.gzip = gzip
        self._raw = bytearray()

    @property
    def received(self) -> int:
        return len(self._raw)

    @property
    def raw(self) -> bytes:
        """The bytes as received (still compressed when the body is gzip): what quarantine keeps."""
        return bytes(self._raw)

    def feed(self, chunk: bytes) -> None:
        if len(self._raw) + len(chunk) > self.limit:
            raise BodyTooLarge(f"the body is larger than max_body_size ({self.limit} bytes)")
        self._raw += chunk

    def finish(self) -> bytes:
        """The decoded body; raises `BodyError` for broken gzip, `BodyTooLarge` when it inflates too far."""
        return inflate(self._raw, self.limit) if self.gzip else bytes(self._raw)


def inflate(data: bytes | bytearray, limit: int) -> bytes:
    """Decompress gzip (one or more members, RFC 1952) into at most `limit` bytes."""
    out = bytearray()
    inflater = zlib.decompressobj(_GZIP)
    member_start = 0
    rest = bytes(data)
    while rest:
        room = limit - len(out) + 1  # never 0: that would mean "no limit" to zlib
        try:
            out += inflater.decompress(rest, room)
        except zlib.error as exc:
            raise BodyError(f"the body is not valid gzip (member starting at byte {member_start}): {exc}") from None
        if len(out) > limit:
            raise BodyTooLarge(f"the gzip body inflates to more than max_body_size ({limit} bytes)")
        if inflater.eof:
            rest = inflater.unused_data
            if rest:  # another member follows
                member_start = len(data) - len(rest)
                inflater = zlib.decompressobj(_GZIP)
        else:
            rest = inflater.unconsumed_tail
    if not inflater.eof:
        raise BodyError(f"the gzip body ends before its end-of-stream marker (after {len(data)} bytes)")
    return bytes(out)


def parse_entries(body: bytes, content_type: str = "", max_entries: int | None = None) -> list[Any]:
    """The entries the body holds, for `prepare_batch`: each a parsed JSON value still to pass entry
    validation, or `Accepted` by its fast path (`relay.entry.parse_entry`).

    Accepted shapes: one entry object; an array of entries; an envelope object whose `data` or `events`
    member is the array; NDJSON (one value per line), chosen by content type or when a complete JSON value
    is followed by more on the next line.
    """
    if body.startswith(_BOM):
        body = body[len(_BOM):]
    if not body.strip():
        raise BodyError("the body is empty; expected an entry object, an array of entries or NDJSON")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in NDJSON_TYPES:
        return _limit(_parse_ndjson(body, max_entries), max_entries)
    if body.lstrip()[:1] == b"[" and (entries := _array_entries(body, max_entries)) is not None:
        return entries
    try:
        value = loads(body)
    except orjson.JSONDecodeError as exc:
        after_first = exc.msg.startswith("unexpected content after document")
        if after_first and b"\n" in body[:_byte_pos(exc.pos, body) + 1]:
            return _limit(_parse_ndjson(body, max_entries), max_entries)
        raise BodyError(f"the body is not valid JSON: {_where(exc, body)}") from None
    if isinstance(value, list):
        return _limit(value, max_entries)
    if isinstance(value, dict):
        if "action" not in value:
            for member in ENVELOPE_MEMBERS:
                if isinstance(value.get(member), list):
                    return _limit(value[member], max_entries)
        return [value]
    raise BodyError(f"the body is {_kind(value)}; expected an entry object, an array of entries, an object with "
                    "a `data` or `events` array, or NDJSON")


def prepare_body(body: bytes, content_type: str = "", max_entries: int | None = None) -> Prepared:
    """`parse_entries`, then entry validation: the whole CPU cost of a request, in one call that a worker
    process can run (`relay.Context.workers`)."""
    return prepare_batch(parse_entries(body, content_type, max_entries))


_decode_array = msgspec.json.Decoder(list[msgspec.Raw]).decode


def _array_entries(body: bytes, max_entries: int | None) -> list[Any] | None:
    """An array's entries, each from its own bytes (`parse_entry`); None if the body is not a readable array,
    for the full parse to say what is wrong."""
    try:
        raws = _limit(_decode_array(body), max_entries)
        return [parse_entry(raw) for raw in map(bytes, raws)]
    except (msgspec.DecodeError, RecursionError, orjson.JSONDecodeError):  # orjson nests less deeply
        return None


def _parse_ndjson(body: bytes, max_entries: int | None) -> list[Any]:
    values: list[Any] = []
    offset = 0
    for number, line in enumerate(body.split(b"\n"), start=1):
        text = line.strip()
        if text:
            try:
                values.append(parse_entry(text))
            except orjson.JSONDecodeError as exc:
                lead = len(line) - len(line.lstrip())
                raise BodyError(f"NDJSON line {number} (starting at byte {offset}) is not valid JSON: "
                                f"{exc.msg} at column {exc.colno} (byte {offset + lead + _byte_pos(exc.pos, text)})"
                                ) from None
            if max_entries is not None and len(values) > max_entries:
                break
        offset += len(line) + 1
    return values


def _limit(values: list[Any], max_entries: int | None) -> list[Any]:
    if max_entries is not None and len(values) > max_entries:
        raise BodyTooLarge(f"the body holds more than max_entries_per_request ({max_entries}) entries; "
                           "send smaller batches")
    return values


def _byte_pos(char_pos: int, data: bytes) -> int:
    """orjson reports a character position; the byte offset is what helps with binary tools."""
    return len(data.decode("utf-8", "surrogateescape")[:char_pos].encode("utf-8", "surrogateescape"))


def _where(exc: orjson.JSONDecodeError, body: bytes) -> str:
    return f"{exc.msg} at line {exc.lineno}, column {exc.colno} (byte {_byte_pos(exc.pos, body)})"


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "a JSON string"
    if isinstance(value, bool):
        return "a JSON boolean"
    if value is None:
        return "JSON null"
    return "a JSON number"
