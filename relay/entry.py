"""Validating incoming entries and computing their identity key.

An entry is accepted when it has what every consumer needs (`action`, `occurred_at`, `actor.type`,
`actor.id`) with the right types; everything else passes through unchanged, because the schema grows.
An invalid entry raises `EntryError` naming the field: the caller quarantines it, never drops it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache
from sys import intern
from typing import Any, NamedTuple, final

import msgspec
import orjson

from relay.catalog import ACTOR_TYPES, ENTRY_FIELDS, known_versions
from relay.errors import EntryError

__all__ = [
    "Accepted",
    "EntryRow",
    "NewEntry",
    "Prepared",
    "action_family",
    "dedupe_key",
    "identity_key",
    "loads",
    "parse_entry",
    "parse_occurred_at",
    "prepare",
    "prepare_batch",
    "prepare_raw",
    "stored_dedupe_key",
]

_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


_FROM_ISO = datetime.fromisoformat
_sha256 = hashlib.sha256
_FIRST_64_BITS = struct.Struct(">Q").unpack_from
"""The first 8 bytes as an unsigned big-endian integer: `int.from_bytes(digest[:8], "big")` without the
slice (0.31 -> 0.08 us per entry)."""
_CROCKFORD_TO_BASE32HEX = str.maketrans("ABCDEFGHJKMNPQRSTVWXYZabcdefghjkmnpqrstvwxyz",
                                        "abcdefghijklmnopqrstuvabcdefghijklmnopqrstuv")
"""ULIDs spell their time in Crockford's base 32; `int(_, 32)` reads base32hex, whose digits this maps to
in the same order."""
_TIME_KEY_PERIOD_BITS = 28
"""A time key holds the id's milliseconds modulo 2**28 (3.1 days): enough to keep entries that arrive
together next to each other; the other 35 bits come from the digest, so that two ids made in the same
millisecond share a key once in 2**35 (for a year's 63-bit range of times it would be once in 2**22)."""
_TIME_KEY_DIGEST_BITS = 63 - _TIME_KEY_PERIOD_BITS


class NewEntry(NamedTuple):
    """A validated entry, ready for the journal."""

    key: int
    """`dedupe_key(digest, id, occurred_at)`: what the journal's unique index holds."""
    digest: bytes
    """SHA-256 identity: of the entry's `id`, or of its canonical JSON."""
    data: bytes
    occurred_at: float
    action: str
    actor_type: str
    target_types: str
    """Comma-separated, sorted, for destination filters."""
    unrecognized: tuple[str, ...]
    """What about this entry is not in the documented schema: `action`, `version`, `actor_type`, `field`."""


_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else byte if byte == 0x2D else 0x0A if byte in b"\\\r\n" else 0x20
                         for byte in range(256))
"""A `bytes.translate` table turning every digit into `0`, keeping `-`, a backslash or a line break into `\\n`,
and everything else into a space: a run of digits is then a plain substring search, ~8x faster than the
regular expression `[0-9]{20}` (measured 1.3 against 9.6 us for a 650-byte line), and `prepare_raw` finds
escapes and line breaks in the same pass."""
_TWENTY_DIGITS = b"0" * 20
_MINUS_NINETEEN_DIGITS = b"-" + b"0" * 19


def _may_exceed_64_bits(shape: bytes) -> bool:
    """Whether the input `shape` was translated from (`_DIGITS_AS_ZEROS`) may hold an integer orjson cannot
    read exactly: 20 digits (beyond 2**64 - 1), or a minus and 19 (below -2**63). A run inside a string or
    a fraction only costs the slower exact parse."""
    return _TWENTY_DIGITS in shape or _MINUS_NINETEEN_DIGITS in shape


def loads(raw: bytes | str) -> Any:
    """`orjson.loads`, except that integers beyond 64 bits stay exact.

    orjson turns such a number into a float without a word, which would change the entry; parsed exactly
    instead, the entry fails validation (it cannot be stored as it arrived) and is quarantined, named.
    Only input with a run of 20 digits, or of 19 after a minus, takes the slower stdlib path. That path
    recurses, and stops at about 1,000 levels of nesting where orjson allows 1,024: such input is refused as
    orjson refuses deeper input, with `orjson.JSONDecodeError` (a bare RecursionError would fail the whole
    request or chunk)."""
    value = orjson.loads(raw)
    if _may_exceed_64_bits((raw if isinstance(raw, bytes) else raw.encode()).translate(_DIGITS_AS_ZEROS)):
        try:
            value = json.loads(raw)
        except RecursionError:
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            raise orjson.JSONDecodeError("nested too deeply to read its 20-digit numbers exactly", text, 0) from None
    return value


def parse_occurred_at(value: Any) -> float:
    """RFC 3339 timestamp -> Unix seconds; raises `ValueError` with what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"must be an RFC 3339 timestamp string, not {_json_type(value)}")
    if (seconds := _usual_time(value)) is not None:
        return seconds
    match = _RFC3339.match(value)
    if not match:
        raise ValueError(f"{value[:40]!r} is not an RFC 3339 timestamp (e.g. 2024-05-14T09:30:00.123456Z)")
    date, time, fraction, zone = match.groups()
    fraction = (fraction or "")[:7]  # at most microseconds
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        return datetime.fromisoformat(f"{date}T{time}{fraction}{zone}").timestamp()
    except ValueError as exc:
        raise ValueError(f"{value[:40]!r} is not a valid date and time: {exc}") from None


def _usual_time(value: str) -> float | None:
    """The shape every incident.io entry has (2021-08-17T13:28:57.801578Z), read fast; None for any other
    shape or an impossible date, which the strict path reads or names."""
    if len(value) == 27 and value[26] == "Z" and value[10] == "T" and value[19] == "." and value[4] == "-":
        try:
            return _FROM_ISO(value).timestamp()
        except ValueError:
            return None
    return None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def identity_key(value: dict[str, Any]) -> bytes:
    """The SHA-256 of the entry's `id` when the source supplies one, else of its canonical JSON."""
    return _identity(value)[0]


def _identity(value: dict[str, Any]) -> tuple[bytes, str | None]:
    """The identity digest, and the `id` it is of (None: of the canonical JSON)."""
    entry_id = _identifying_id(value)
    if entry_id is not None:
        return _id_digest(entry_id), entry_id
    return _sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).digest(), None


def _identifying_id(value: dict[str, Any]) -> str | None:
    """The entry's `id` as its identity: a non-empty string or an integer (as text); else None."""
    entry_id = value.get("id")
    if isinstance(entry_id, (str, int)) and not isinstance(entry_id, bool) and entry_id != "":
        return str(entry_id)
    return None


def _id_digest(entry_id: str) -> bytes:
    return _sha256(b"id:" + entry_id.encode()).digest()


def _target_types(types: set[str]) -> str:
    """Comma-separated and sorted (for destination filters); interned, as a batch repeats a few."""
    return intern(",".join(sorted(types)) if len(types) > 1 else "".join(types))


def dedupe_key(digest: bytes, entry_id: str | None, occurred_at: float) -> int:
    """What the journal's unique index holds for an entry: a 64-bit integer, the same whenever the identity
    is the same; the whole digest is kept beside it so that two entries sharing a key are told apart.

    The key begins with a time when the identity has one: the time an `id` was made, when it says so (a
    ULID, as incident.io and WorkOS use, optionally after a `prefix_`; or a UUIDv7), or `occurred_at` for
    an entry without an `id` (identified by its JSON, which holds it). Entries arrive roughly in time
    order, so their keys land next to each other in the index, and a commit rewrites a few of its pages
    rather than one page per entry scattered over all of them (measured: journaling 1M entries 43k ->
    135k/s, and the rate stays flat as the journal grows instead of falling by half). Such keys are >= 0;
    an `id` without a time takes 63 bits of the digest as a key < 0, so the two kinds never meet."""
    bits: int = _FIRST_64_BITS(digest)[0] >> 1
    millis = _id_time(entry_id) if entry_id is not None else int(occurred_at * 1000)
    if millis is None:
        return -1 - bits
    return (millis % (1 << _TIME_KEY_PERIOD_BITS)) << _TIME_KEY_DIGEST_BITS | bits & ((1 << _TIME_KEY_DIGEST_BITS) - 1)


def stored_dedupe_key(digest: bytes, data: bytes, occurred_at: float) -> int:
    """`dedupe_key` of an entry already journaled (its digest, stored JSON and `occurred_at` column): for
    the journal's migration from the keys of earlier versions."""
    entry_id = _identifying_id(orjson.loads(data))
    return dedupe_key(digest, entry_id if entry_id is not None and _id_digest(entry_id) == digest else None,
                      occurred_at)


def _id_time(entry_id: str) -> int | None:
    """The milliseconds a ULID (`01HXV1V4HQ...`, `event_01HXV1V4HQ...`) or a UUIDv7 begins with.

    Only the key's locality depends on reading it right: anything else that looks like one gives some
    number, and the key stays a function of the id, which is all deduplication needs."""
    length = len(entry_id)
    try:
        if length == 26 or (length > 26 and entry_id[-27] in "_-"):
            return int(entry_id[-26:-16].translate(_CROCKFORD_TO_BASE32HEX), 32)
        if length == 36 and entry_id[14] == "7" and entry_id[8] == "-":
            return int(entry_id[:8] + entry_id[9:13], 16)
    except ValueError:
        pass
    return None


def _non_finite(value: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in `value`, if there is one."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(the entry)"
    if isinstance(value, dict):
        for key, item in value.items():
            if (found := _non_finite(item, f"{path}.{key}" if path else str(key))) is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if (found := _non_finite(item, f"{path}[{index}]")) is not None:
                return found
    return None


def prepare(value: Any) -> NewEntry:
    """Validate one entry (a parsed JSON value); raise `EntryError` naming the field that is wrong."""
    if not isinstance(value, dict):
        raise EntryError("", f"an entry must be a JSON object, not {_json_type(value)}")
    action = value.get("action")
    if not isinstance(action, str) or not action.strip():
        raise EntryError("action", "missing" if action is None else "must be a non-empty string")
    if "occurred_at" not in value:
        raise EntryError("occurred_at", "missing")
    try:
        occurred_at = parse_occurred_at(value["occurred_at"])
    except ValueError as exc:
        raise EntryError("occurred_at", str(exc)) from None
    actor = value.get("actor")
    if not isinstance(actor, dict):
        raise EntryError("actor", "missing" if actor is None else f"must be an object, not {_json_type(actor)}")
    for name in ("type", "id"):
        if not isinstance(actor.get(name), str) or not actor[name]:
            raise EntryError(f"actor.{name}", "missing" if actor.get(name) is None else "must be a non-empty string")
    version = value.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise EntryError("version", f"must be an integer, not {_json_type(version)}")
    targets = value.get("targets")
    target_types: set[str] = set()
    if targets is not None:
        if not isinstance(targets, list):
            raise EntryError("targets", f"must be an array, not {_json_type(targets)}")
        for index, target in enumerate(targets):
            if not isinstance(target, dict):
                raise EntryError(f"targets[{index}]", f"must be an object, not {_json_type(target)}")
            if isinstance(target.get("type"), str):
                target_types.add(target["type"])
    context = value.get("context")
    if context is not None and not isinstance(context, dict):
        raise EntryError("context", f"must be an object, not {_json_type(context)}")
    try:
        data = orjson.dumps(value)
        digest, entry_id = _identity(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise EntryError("", f"cannot be represented as JSON: {exc}") from None
    if b"null" in data and (where := _non_finite(value)) is not None:  # orjson writes NaN as null: say so
        raise EntryError(where, "NaN and Infinity cannot be represented as JSON")
    # Interned: a batch repeats a few dozen actions and types, and pickle (from a parse worker) then sends
    # each one once, not once per entry (measured: half the pickling time).
    return NewEntry(dedupe_key(digest, entry_id, occurred_at), digest, data, occurred_at, intern(action),
                    intern(actor["type"]), _target_types(target_types),
                    _unrecognized(action, version, actor["type"], ENTRY_FIELDS.issuperset(value)))


@lru_cache(maxsize=4096)
def _unrecognized(action: str, version: int | None, actor_type: str, fields_known: bool) -> tuple[str, ...]:
    """What about an entry is not in the documented schema (remembered: a batch repeats a few dozen
    combinations)."""
    unrecognized: list[str] = []
    versions = known_versions().get(action)
    if versions is None:
        unrecognized.append("action")
    elif version is not None and version not in versions:
        unrecognized.append("version")
    if actor_type not in ACTOR_TYPES:
        unrecognized.append("actor_type")
    if not fields_known:
        unrecognized.append("field")
    return tuple(unrecognized)


class _Actor(msgspec.Struct):
    type: str
    id: str


_ABSENT = msgspec.Raw(b"")
"""The value of a field that is not there (a present field's raw JSON is never empty)."""


class _Target(msgspec.Struct):
    type: Any = msgspec.UNSET
    id: msgspec.Raw = _ABSENT


class _Shape(msgspec.Struct, forbid_unknown_fields=True):
    """What `prepare_raw` accepts: the documented top-level fields (`ENTRY_FIELDS`) and no other, with the
    types `prepare` checks; what the relay does not read is skipped, unbuilt."""

    id: str
    action: str
    occurred_at: str
    actor: _Actor
    version: int | None = None
    targets: list[_Target] | None = None
    context: dict[str, Any] | None = None
    object: msgspec.Raw = _ABSENT
    organization_id: msgspec.Raw = _ABSENT
    metadata: msgspec.Raw = _ABSENT


_decode_shape = msgspec.json.Decoder(_Shape).decode


def prepare_raw(raw: bytes) -> EntryRow | None:
    """The fast path for one entry as JSON text: the row `prepare(loads(raw))` would give, with `raw`
    itself as its data, or None where that full path must decide (and name what is wrong).

    msgspec checks the shape while parsing, in C, and skips what the relay does not read, so the entry is
    neither built as Python objects nor serialized again (measured 8.1-8.5 against 9.7-10.5 us per 650-byte line,
    and a quarter less CPU in the workers of an import). The data is then the entry's bytes as they
    arrived. Only what is unambiguous takes this path: UTF-8 without line breaks or escapes (a key written
    with escapes could hide a duplicate), the documented top-level fields and no other, an `id`, no integer
    beyond 64 bits, and each key the relay decides by (`id`, `action`, `occurred_at`, `actor` and its `type`
    and `id`, `targets` and their `type`) there once, as its quoted name counted in the bytes shows: with a
    duplicate key, a receiver could read another value than the one checked here. A name also found in a
    string or in `metadata` only sends the entry down the full path."""
    shape = raw.translate(_DIGITS_AS_ZEROS)  # escapes and line breaks become `\n` in the same pass
    if b"\n" in shape or _may_exceed_64_bits(shape):
        return None
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError:
            return None
    try:
        entry = _decode_shape(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    action, actor, version = entry.action, entry.actor, entry.version
    occurred_at = _usual_time(entry.occurred_at)
    if occurred_at is None or not (entry.id and action.strip() and actor.type and actor.id):
        return None
    ids, types, target_types = 2, 1, set[str]()
    for target in entry.targets or ():
        ids += bool(target.id)
        if target.type is not msgspec.UNSET:
            types += 1
            if isinstance(target.type, str):
                target_types.add(target.type)
    if (raw.count(b'"id"') != ids or raw.count(b'"type"') != types or raw.count(b'"action"') > 1
            or raw.count(b'"occurred_at"') > 1 or raw.count(b'"actor"') > 1 or raw.count(b'"targets"') > 1):
        return None
    digest = _id_digest(entry.id)
    return (dedupe_key(digest, entry.id, occurred_at), digest, raw, occurred_at, intern(action), intern(actor.type),
            _target_types(target_types), _unrecognized(action, version, actor.type, True))


EntryRow = tuple[int, bytes, bytes, float, str, str, str, tuple[str, ...]]
"""A `NewEntry` as a plain tuple (same fields, same order): what `Prepared` carries across processes,
because unpickling a plain tuple costs a quarter of a named one (0.7 against 2.7 us)."""


@final
class Accepted:
    """An entry `prepare_raw` accepted, among parsed values (which a source's own code may make of any
    type): `prepare_batch` takes its row as it is."""

    __slots__ = ("row",)

    def __init__(self, row: EntryRow) -> None:
        self.row = row


def parse_entry(raw: bytes) -> Any:
    """One entry's JSON text, for `prepare_batch`: `Accepted` by the fast path, else parsed (`loads`, which
    raises `orjson.JSONDecodeError`) for the full path to validate."""
    row = prepare_raw(raw)
    return Accepted(row) if row is not None else loads(raw)


@dataclass
class Prepared:
    """A batch of input, validated: what goes into the journal and what into quarantine.

    Picklable, so a worker process can prepare it (`relay.workers`); `accepted` then holds plain tuples."""

    accepted: list[EntryRow]
    quarantined: list[tuple[str, bytes]]
    """`(reason, raw input)` for each invalid item."""
    problems: list[tuple[int, str]]
    """`(index in the input, reason)` for each invalid item."""
    families: Counter[str]
    """Accepted entries per action family (for the metric)."""
    unrecognized: Counter[str]

    def __len__(self) -> int:
        return len(self.accepted) + len(self.quarantined)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "accepted": [tuple(entry) for entry in self.accepted]}


def prepare_batch(items: Sequence[Any], labels: Sequence[str] | None = None,
                  raws: Sequence[bytes] | None = None) -> Prepared:
    """Validate `items`; an invalid one is reported under `labels[i]` (default "entry i") and kept as
    `raws[i]` (default its JSON). An item `parse_entry` took by the fast path is taken as it is. Run it, with
    the parsing, in a worker process (`relay.workers`) for large input: in a worker thread it measured slower
    than on the event loop (two threads fighting over the GIL)."""
    accepted: list[EntryRow] = []
    quarantined: list[tuple[str, bytes]] = []
    problems: list[tuple[int, str]] = []
    append = accepted.append
    for index, item in enumerate(items):
        if type(item) is Accepted:
            append(item.row)
            continue
        try:
            append(prepare(item))
        except EntryError as exc:
            reason = f"{labels[index] if labels is not None else f'entry {index}'}: {exc}"
            problems.append((index, reason))
            quarantined.append((reason, raws[index] if raws is not None else _raw(item)))
    families: Counter[str] = Counter()
    for action, count in Counter(e[4] for e in accepted).items():  # a family per action, not per entry
        families[action_family(action)] += count
    unrecognized = Counter(kind for e in accepted if e[7] for kind in e[7])
    return Prepared(accepted, quarantined, problems, families, unrecognized)


_REPR = reprlib.Repr()
"""For quarantining what JSON cannot hold: bounded in depth and size, so a hostile value cannot exhaust
the stack (plain `repr` of a value nested 10,000 deep raises RecursionError) or memory."""
_REPR.maxlevel = 64
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxother = 10_000
_REPR.maxstring, _REPR.maxlong = 1_000_000, 1_000


def _raw(item: Any) -> bytes:
    """The bytes kept in quarantine for an item that failed validation: JSON when possible."""
    try:
        return orjson.dumps(item)
    except (TypeError, orjson.JSONEncodeError):
        pass
    try:  # keys that are not strings, bytes, sets, 100-digit numbers: as JSON, with such values as repr()
        return orjson.dumps(item, default=repr, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return _REPR.repr(item).encode("utf-8", "backslashreplace")


def action_family(action: str) -> str:
    """`api_key.created` -> `api_key`; families not in the catalog become `other` (bounded metric labels)."""
    family = action.split(".", 1)[0]
    return family if family in _known_families() else "other"


@cache
def _known_families() -> frozenset[str]:
    return frozenset(action.split(".", 1)[0] for action in known_versions())
