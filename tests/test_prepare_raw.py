"""`prepare_raw`, the fast path of entry validation, held to the full path it stands in for."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.catalog import ENTRY_FIELDS
from relay.entry import loads, parse_entry, prepare, prepare_batch, prepare_raw
from relay.errors import EntryError

ENTRY: dict[str, Any] = {
    "id": "01HXV1V4HQ3XBWPYKA1Y5Z95EQ", "action": "workflow.updated", "version": 2,
    "occurred_at": "2024-05-14T08:00:00.567158Z",
    "actor": {"type": "user", "id": "01GD02JV00P6T38899HTG6DQPB", "name": "Radia Ritchie",
              "metadata": {"email": "radia.ritchie@example.com"}},
    "targets": [{"type": "workflow", "id": "01GFZB9E00HCQYQMJ5114N9NJS", "name": "Create ticket",
                 "metadata": {"trigger": "incident.updated", "version": 8}}],
    "context": {"location": "192.0.2.7", "user_agent": "curl/8.5.0"},
}


def full_path(raw: bytes) -> tuple[Any, ...]:
    return tuple(prepare(loads(raw)))


def test_a_compact_entry_takes_the_fast_path_with_its_own_bytes_as_data() -> None:
    raw = orjson.dumps(ENTRY)
    row = prepare_raw(raw)
    assert row is not None
    assert row[2] is raw
    expected = full_path(raw)
    assert row[:2] + row[3:] == expected[:2] + expected[3:]


def test_entries_the_catalog_does_not_know_keep_their_labels() -> None:
    raw = orjson.dumps({**ENTRY, "action": "thing.invented", "actor": {"type": "robot", "id": "r1"}})
    row = prepare_raw(raw)
    assert row is not None and row[7] == ("action", "actor_type") == full_path(raw)[7]


def test_the_shape_is_the_documented_fields() -> None:
    from relay.entry import _Shape

    assert set(_Shape.__struct_fields__) == ENTRY_FIELDS


def _swap(old: bytes, new: bytes) -> bytes:
    raw = orjson.dumps(ENTRY)
    assert old in raw
    return raw.replace(old, new, 1)


@pytest.mark.parametrize("raw", [
    pytest.param(_swap(b'{"id":', b'{"id":"x","id":'), id="a second id"),
    pytest.param(_swap(b'"action":', b'"action":"user.created","action":'), id="a second action"),
    pytest.param(_swap(b'"occurred_at":', b'"occurred_at":"2020-01-01T00:00:00.000000Z","occurred_at":'),
                 id="a second occurred_at"),
    pytest.param(_swap(b'"actor":{', b'"actor":{"type":"system","id":"s","x":1},"actor":{'), id="a second actor"),
    pytest.param(_swap(b'"actor":{"type":"user"', b'"actor":{"type":"system","type":"user"'),
                 id="a second actor.type"),
    pytest.param(_swap(b'[{"type":"workflow"', b'[{"type":"user","type":"workflow"'), id="a second target type"),
    pytest.param(_swap(b'"targets":', b'"targets":[],"targets":'), id="a second targets"),
    pytest.param(_swap(b'"action":', b'"\\u0061ction":"user.created","action":'), id="a key written with escapes"),
    pytest.param(_swap(b'"Radia', b'"Ra\\"dia'), id="an escape in a string"),
    pytest.param(orjson.dumps(ENTRY, option=orjson.OPT_INDENT_2), id="pretty-printed"),
    pytest.param(_swap(b'"version":2', b'"version":\r2'), id="a carriage return between tokens"),
    pytest.param(orjson.dumps({k: v for k, v in ENTRY.items() if k != "id"}), id="no id"),
    pytest.param(orjson.dumps({**ENTRY, "id": ""}), id="an empty id"),
    pytest.param(orjson.dumps({**ENTRY, "source_ip": "192.0.2.1"}), id="a field not in the schema"),
    pytest.param(_swap(b'"version":8', b'"version":18446744073709551616'), id="an integer beyond 64 bits"),
    pytest.param(_swap(b'"version":8', b'"version":-9223372036854775809'), id="an integer below -2**63"),
    pytest.param(_swap(b'"Radia', b'"Ra\xff'), id="not UTF-8"),
    pytest.param(_swap(b'"version":8', b'"version":NaN'), id="NaN"),
    pytest.param(orjson.dumps({**ENTRY, "occurred_at": "2024-05-14T08:00:00Z"}), id="another timestamp shape"),
    pytest.param(orjson.dumps({**ENTRY, "version": True}), id="a boolean version"),
    pytest.param(orjson.dumps({**ENTRY, "targets": ["workflow"]}), id="a target that is not an object"),
    pytest.param(orjson.dumps({**ENTRY, "action": " "}), id="a blank action"),
])
def test_what_the_fast_path_leaves_to_the_full_path(raw: bytes) -> None:
    assert prepare_raw(raw) is None


def test_integers_beyond_64_bits_after_a_minus_are_read_exactly() -> None:
    """orjson turns -2**63 - 1 (19 digits) into a float, as it does 2**64 (20 digits)."""
    assert loads(b"[-9223372036854775809]") == [-9223372036854775809]


_KEYS = st.sampled_from(["name", "x", "y", "z", "name", "x", "id", "type", "action", "version", "targets", "actor"])
_TEXT = st.text(st.characters(max_codepoint=0x7F, exclude_categories=("Cs",)), max_size=6) | st.text(max_size=4)
_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | _TEXT)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
                       max_leaves=6)


def _often(*choices: Any) -> st.SearchStrategy[Any]:
    """The first choice most of the time (so that many examples are valid entries), the others sometimes."""
    return st.sampled_from([choices[0]] * (2 * len(choices)) + list(choices[1:]))


@st.composite
def entries(draw: st.DrawFn) -> bytes:
    """Entries as text: most of them valid, with metadata whose names collide with the fields the relay
    reads, odd values, sometimes a key written twice, compact or spaced, escaped or not."""
    value: dict[str, Any] = {
        "id": draw(_often("01HXV1V4HQ", "", 7)),
        "action": draw(_often("workflow.updated", "user.created", "made.up", " ")),
        "occurred_at": draw(_often("2024-05-14T08:00:00.567158Z", "2024-05-14T08:00:00Z", "2024-02-30T08:00:00.567158Z",
                                   "yesterday")),
        "actor": {"type": draw(_often("user", "robot", "")), "id": draw(_often("u1", "", None)),
                  "metadata": draw(_VALUES)},
    }
    if draw(st.booleans()):
        value["version"] = draw(st.none() | st.integers(min_value=-3, max_value=3) | _SCALARS)
    if draw(st.booleans()):
        value["targets"] = draw(st.lists(st.fixed_dictionaries({}, optional={"type": _often("workflow", 3, None),
                                                                             "id": _TEXT, "metadata": _VALUES}),
                                         max_size=3))
    for name in draw(st.sets(_often("context", "metadata", "object", "unknown"), max_size=2)):
        value[name] = draw(st.dictionaries(_KEYS, _VALUES, max_size=3) if name == "context" else _VALUES)
    value = {name: value[name] for name in draw(st.permutations(list(value)))}
    if draw(st.booleans()) and all(-(2**63) <= n < 2**64 for n in _ints(value)):
        raw = orjson.dumps(value)
    else:
        raw = json.dumps(value, ensure_ascii=draw(st.booleans()),
                         separators=draw(_often((",", ":"), (", ", ": ")))).encode()
    if draw(_often(False, True)):  # a key written a second time, somewhere
        braces = [i for i, c in enumerate(raw) if c == ord("{")]
        start = braces[draw(st.integers(min_value=0, max_value=len(braces) - 1))] + 1
        raw = (raw[:start] + b'"' + draw(_KEYS).encode() + b'":' + json.dumps(draw(_SCALARS)).encode()
               + (b"," if raw[start:start + 1] != b"}" else b"") + raw[start:])
    return raw


def _ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [n for item in value.values() for n in _ints(item)]
    if isinstance(value, list):
        return [n for item in value for n in _ints(item)]
    return []


@settings(max_examples=600, deadline=None)
@given(entries())
def test_the_fast_path_accepts_only_what_the_full_path_accepts_and_labels_it_the_same(raw: bytes) -> None:
    row = prepare_raw(raw)
    if row is None:
        return
    try:
        expected = full_path(raw)
    except EntryError as exc:
        raise AssertionError(f"the fast path took what the full path refuses: {exc}") from None
    assert row[:2] + row[3:] == expected[:2] + expected[3:]
    assert row[2] == raw
    assert json.loads(raw) == json.loads(expected[2]), "the same entry, read as any JSON reader reads it"


def test_a_batch_takes_fast_path_rows_as_they_are_and_validates_everything_else() -> None:
    """Entries a source's own code makes can be any Python value, a tuple too: only `Accepted` skips
    validation."""
    raw = orjson.dumps(ENTRY)
    prepared = prepare_batch([parse_entry(raw), (0,), parse_entry(_swap(b'{"id":', b'{"id":"x","id":'))])
    assert [row[2] for row in prepared.accepted] == [raw, orjson.dumps(ENTRY)]
    assert prepared.problems == [(1, "entry 1: an entry must be a JSON object, not tuple")]


def test_a_key_the_relay_does_not_decide_by_may_repeat_and_is_kept_as_sent() -> None:
    """Like any relay that forwards bytes as received; the relay's own reading (the last value, as orjson's)
    only feeds the `unrecognized` metric."""
    raw = _swap(b'"version":2', b'"version":1,"version":2')
    row = prepare_raw(raw)
    assert row is not None and row[2] == raw
    expected = full_path(raw)
    assert row[:2] + row[3:] == expected[:2] + expected[3:]


def test_an_entry_nested_deeper_than_orjson_reads_never_takes_the_fast_path() -> None:
    """Destinations read stored data with orjson (filters' `drop_fields`, syslog, HEC fields), which stops at
    1,024 levels; msgspec stops sooner, so such an entry goes to the full path, which quarantines it."""
    raw = orjson.dumps(ENTRY)[:-1] + b',"metadata":' + b"[" * 1100 + b"]" * 1100 + b"}"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    assert prepare_raw(raw) is None
