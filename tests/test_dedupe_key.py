"""The journal's dedupe key: a function of the identity alone, time-ordered for ids that begin with a time
and for entries without an id, and migrated from the keys of earlier versions so that deduplication holds
across an upgrade."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import journal_schema
from relay.entry import _id_digest, dedupe_key, identity_key, prepare, stored_dedupe_key
from relay.intake import JournalIntake
from relay.journal_schema import JOURNAL_FILE
from tests.helpers import entry, journal_db
from tests.journal_harness import open_journal

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid(millis: int, tail: str = "3XBWPYKA1Y5Z95EQ") -> str:
    head = ""
    for _ in range(10):
        millis, digit = divmod(millis, 32)
        head = CROCKFORD[digit] + head
    return head + tail


def digest_key(digest: bytes) -> int:
    return -1 - (int.from_bytes(digest[:8], "big") >> 1)


def test_keys_stored_by_this_version_do_not_change() -> None:
    """Changing how a key is made needs a journal migration (as m002 did): these pin the current scheme."""
    assert dedupe_key(_id_digest("01HXV1V4HQ3XBWPYKA1Y5Z95EQ"), "01HXV1V4HQ3XBWPYKA1Y5Z95EQ", 0) == 3525352852649972480
    assert dedupe_key(_id_digest("event_01HXV1V4HQ3XBWPYKA1Y5Z95EQ"),
                      "event_01HXV1V4HQ3XBWPYKA1Y5Z95EQ", 0) == 3525352830240800744
    assert dedupe_key(_id_digest("018f7a4e-3b2c-7d1e-9f00-123456789abc"),
                      "018f7a4e-3b2c-7d1e-9f00-123456789abc", 0) == 5940768408823433637
    assert dedupe_key(_id_digest("abc"), "abc", 0) == -7234677806119787168
    assert dedupe_key(hashlib.sha256(b"x").digest(), None, 1715673600.567) == 3525352833615616034


@given(st.binary(min_size=32, max_size=32), st.one_of(st.none(), st.text(max_size=40)),
       st.floats(-1e10, 1e11, allow_nan=False))
def test_a_key_is_a_signed_64_bit_function_of_the_identity(digest: bytes, entry_id: str | None,
                                                           occurred_at: float) -> None:
    key = dedupe_key(digest, entry_id, occurred_at)
    assert -(2**63) <= key < 2**63
    assert key == dedupe_key(digest, entry_id, occurred_at)
    if entry_id is not None:
        assert key == dedupe_key(digest, entry_id, occurred_at + 1), "an id's key does not depend on the time"
    if key < 0:
        assert entry_id is not None and key == digest_key(digest)
    else:
        assert key % 2**35 == (int.from_bytes(digest[:8], "big") >> 1) % 2**35


@given(st.integers(0, 2**48 - 1), st.lists(st.integers(0, 2**28 - 1), min_size=2, max_size=20, unique=True))
def test_ulid_keys_are_in_the_order_of_the_ids_times(start: int, offsets: list[int]) -> None:
    """What makes journaling cheap: entries arriving in time order land next to each other in the index.
    Keys hold the time modulo 2**28 ms (3.1 days): in order from the start of each such period."""
    start -= start % 2**28
    times = [start + offset for offset in offsets if start + offset < 2**48]
    keys = {t: dedupe_key(_id_digest(ulid(t)), ulid(t), 0) for t in times}
    assert [keys[t] for t in sorted(times)] == sorted(keys.values())
    assert all(key >= 0 for key in keys.values())


@pytest.mark.parametrize("form", [str.lower, lambda u: "evt_" + u, lambda u: "audit-log-event-" + u])
def test_a_ulid_s_time_is_read_in_any_case_and_after_a_prefix(form) -> None:  # type: ignore[no-untyped-def]
    plain = ulid(1715673600567)
    assert dedupe_key(b"\0" * 32, form(plain), 0) == dedupe_key(b"\0" * 32, plain, 0) == (1715673600567 % 2**28) << 35


def test_a_uuid7_s_time_is_read_and_other_uuids_take_a_digest_key() -> None:
    v7 = "018f7a4e-3b2c-7d1e-9f00-123456789abc"
    assert dedupe_key(b"\0" * 32, v7, 0) == (0x018F7A4E3B2C % 2**28) << 35
    v4 = str(uuid.UUID(bytes=hashlib.sha256(b"x").digest()[:16], version=4))
    assert dedupe_key(_id_digest(v4), v4, 0) == digest_key(_id_digest(v4))


@pytest.mark.parametrize("entry_id", ["42", "user-1", "!" * 26, "x_" + "!" * 26, "0" * 36])
def test_ids_without_a_time_take_a_digest_key(entry_id: str) -> None:
    """An id that is not a ULID or a UUIDv7: the digest's bits, below zero."""
    digest = hashlib.sha256(b"whatever").digest()
    assert dedupe_key(digest, entry_id, 1715673600.0) == digest_key(digest)


def test_prepare_keys_entries_by_their_id_s_time_or_else_by_occurred_at() -> None:
    with_ulid = prepare(entry(id=ulid(1715673600567)))
    assert with_ulid.key >> 35 == 1715673600567 % 2**28
    without_id = prepare(entry(occurred_at="2024-05-14T09:30:00.123456Z"))
    assert without_id.key >> 35 == 1715679000123 % 2**28
    assert without_id.key % 2**35 == (int.from_bytes(identity_key(entry())[:8], "big") >> 1) % 2**35
    plain = prepare(entry(id="user-1"))
    assert plain.key == digest_key(_id_digest("user-1"))
    for row in (with_ulid, without_id, plain):
        assert stored_dedupe_key(row.digest, row.data, row.occurred_at) == row.key


async def test_a_journal_of_an_earlier_version_is_migrated_and_still_deduplicates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys written before m002 (64 bits of the digest) are rewritten at the first start: an entry sent again
    after the upgrade is still a duplicate. A re-delivery's row (routed to one destination) keeps no key."""
    entries = [entry(id=ulid(1715673600000 + i)) for i in range(20)] + [entry(id=f"plain-{i}") for i in range(5)]
    entries += [entry(f"user.updated.{i}") for i in range(5)]  # no id: identified by their JSON
    monkeypatch.setattr(journal_schema, "MIGRATIONS", journal_schema.MIGRATIONS[:1])
    async with open_journal(tmp_path) as journal:
        old = [row._replace(key=int.from_bytes(row.digest[:8], "big", signed=True))
               for row in map(prepare, entries)]
        assert await journal.append("push", old, (), None, keep_cursor=True) == 30
    with sqlite3.connect(tmp_path / JOURNAL_FILE) as db:
        db.execute("INSERT INTO entries (key, digest, source, route, received_at, occurred_at, action, actor_type,"
                   " target_types, data) SELECT NULL, digest, source, 'out', received_at, occurred_at, action,"
                   " actor_type, target_types, data FROM entries WHERE seq = 1")
    monkeypatch.undo()

    async with open_journal(tmp_path) as journal:
        assert (tmp_path / f"{JOURNAL_FILE}-wal").stat().st_size == 0, "the migration's copy in the WAL is let go"
        again = await JournalIntake("push", journal, None).submit(entries)
    assert (again.accepted, again.duplicates) == (0, 30)
    with journal_db(tmp_path) as db:
        rows = db.execute("SELECT key, digest, data, route FROM entries ORDER BY seq").fetchall()
        assert db.execute("SELECT name FROM migrations ORDER BY name").fetchall() == [
            ("m001_initial",), ("m002_time_ordered_keys",)]
    assert [key for key, _, _, route in rows if route is not None] == [None]
    assert [key for key, _, _, route in rows if route is None] == [prepare(e).key for e in entries]
    assert sum(key >= 0 for key, *_ in rows if key is not None) == 25, "all but the 5 plain ids carry a time"
