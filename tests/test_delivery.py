"""The delivery loop: retries, halts, dead letters, filters and ordered offsets, through the whole relay."""

from __future__ import annotations

from pathlib import Path

import trio

import relay
from relay.config import Config
from tests import scripted
from tests.helpers import config_dict, dead_letters, destination_row, entry, make_config, metric_value, running_relay


def _config(tmp_path: Path, **destination: object) -> Config:
    dest = {"type": "scripted", "script": "main", "retry": {"initial_backoff": "10ms", "max_backoff": "50ms"}}
    dest.update(destination)
    return make_config(config_dict(tmp_path, {"in": {"type": "manual"}}, {"out": dest}), extra=[scripted])


def _entries(n: int, action: str = "api_key.created") -> list[dict[str, object]]:
    return [entry(action, occurred_at=f"2024-05-14T09:30:{i % 60:02d}.{i:06d}Z") for i in range(n)]


async def test_transient_failures_then_success(tmp_path: Path, script: scripted.Script) -> None:
    script.answers = [relay.RetryLater("HTTP 503 Service Unavailable")] * 3
    retries_before = metric_value("audit_relay_destination_retries_total", destination="out", outcome="retry")
    delivered_before = metric_value("audit_relay_destination_entries_delivered_total", destination="out")
    async with running_relay(_config(tmp_path)) as service:
        result = await service.sources["in"].intake.submit(_entries(5))
        assert result.accepted == 5
        await script.wait(lambda s: len(s.delivered) == 5)
        with trio.fail_after(30):
            await service.destinations["out"].loop.wait_offset(5)
    assert len(script.batches) == 4
    assert {b.id for b in script.batches} == {script.batches[0].id}, "a retried batch keeps its identity"
    assert [b.attempt for b in script.batches] == [1, 2, 3, 4]
    assert destination_row(tmp_path / "state", "out")["offset"] == 5
    assert metric_value("audit_relay_destination_retries_total", destination="out", outcome="retry") \
        - retries_before == 3
    assert metric_value("audit_relay_destination_entries_delivered_total", destination="out") - delivered_before == 5


async def test_halted_destination_keeps_its_offset_and_recovers(tmp_path: Path, script: scripted.Script) -> None:
    script.answers = [relay.Halted("HTTP 401 Unauthorized: token revoked")] * 2
    halted_before = metric_value("audit_relay_destination_retries_total", destination="out", outcome="halted")
    async with running_relay(_config(tmp_path)) as service:
        loop = service.destinations["out"].loop
        await service.sources["in"].intake.submit(_entries(3))
        with trio.fail_after(30):
            await loop.wait_state("halted")
        assert loop.offset == 0
        assert destination_row(tmp_path / "state", "out")["state"] == "halted"
        assert "token revoked" in destination_row(tmp_path / "state", "out")["state_reason"]
        with trio.fail_after(30):
            await loop.wait_offset(3)
        assert loop.state == "up"
    assert len(script.delivered) == 3
    assert metric_value("audit_relay_destination_retries_total", destination="out", outcome="halted") \
        - halted_before == 2


async def test_rejected_entry_goes_to_dead_letters_the_rest_is_delivered(tmp_path: Path,
                                                                         script: scripted.Script) -> None:
    script.answers = [relay.Rejected({1: "HEC code 6: Invalid data format"})]
    dead_before = metric_value("audit_relay_destination_entries_dead_lettered_total", destination="out")
    async with running_relay(_config(tmp_path)) as service:
        await service.sources["in"].intake.submit(_entries(4))
        with trio.fail_after(30):
            await service.destinations["out"].loop.wait_offset(4)
    assert [e.seq for e in script.delivered] == [1, 3, 4]
    dead = dead_letters(tmp_path / "state", "out")
    assert [(seq, reason) for seq, reason, _ in dead] == [(2, "HEC code 6: Invalid data format")]
    assert dead[0][2].startswith(b'{"action":"api_key.created"')
    assert metric_value("audit_relay_destination_entries_dead_lettered_total", destination="out") - dead_before == 1


async def test_partial_acceptance_resends_only_the_rest(tmp_path: Path, script: scripted.Script) -> None:
    """Splunk-style: entries before N indexed, N bad, the rest must be sent again."""
    script.answers = [relay.Rejected({2: "bad"}, resend_from=3)]
    async with running_relay(_config(tmp_path)) as service:
        await service.sources["in"].intake.submit(_entries(6))
        with trio.fail_after(30):
            await service.destinations["out"].loop.wait_offset(6)
    assert [e.seq for e in script.batches[0].entries] == [1, 2, 3, 4, 5, 6]
    assert [e.seq for e in script.batches[1].entries] == [4, 5, 6]
    assert script.batches[1].first_seq == 4 and script.batches[1].last_seq == 6
    assert [e.seq for e in script.delivered] == [1, 2, 4, 5, 6]
    assert [seq for seq, _, _ in dead_letters(tmp_path / "state", "out")] == [3]


async def test_filters_and_drop_fields(tmp_path: Path, script: scripted.Script) -> None:
    config = _config(tmp_path, filter={"actions": ["api_key.*"], "exclude_actions": ["api_key.deleted"]},
                     drop_fields=["context.location", "targets.name"])
    filtered_before = metric_value("audit_relay_destination_entries_filtered_total", destination="out")
    async with running_relay(config) as service:
        entries = [*_entries(2, "api_key.created"), *_entries(2, "user.created"), *_entries(1, "api_key.deleted")]
        await service.sources["in"].intake.submit(entries)
        with trio.fail_after(30):
            await service.destinations["out"].loop.wait_offset(5)
    assert [e.action for e in script.delivered] == ["api_key.created", "api_key.created"]
    value = script.delivered[0].value()
    assert "location" not in value["context"] and value["context"]["user_agent"] == "curl/8.5.0"
    assert "name" not in value["targets"][0] and value["targets"][0]["type"] == "api_key"
    assert metric_value("audit_relay_destination_entries_filtered_total", destination="out") - filtered_before == 3


async def test_concurrent_batches_commit_offsets_in_order(tmp_path: Path, script: scripted.Script) -> None:
    """With three batches in flight, a later batch finishing first must not move the offset past an
    earlier one still failing."""
    first_attempts: set[int] = set()

    def fail_first_batch_twice(batch: relay.Batch) -> relay.Result:
        if batch.first_seq == 1 and batch.attempt <= 2:
            return relay.RetryLater("slow start")
        first_attempts.add(batch.first_seq)
        return relay.Delivered()

    script.answers = [fail_first_batch_twice] * 20
    config = _config(tmp_path, concurrency=3, batch={"max_entries": 2, "max_wait": "1s"})
    async with running_relay(config) as service:
        loop = service.destinations["out"].loop
        offsets: list[int] = []

        async def watch() -> None:
            seen = 0
            while True:
                await loop.wait_offset(seen + 1)
                seen = loop.offset
                offsets.append(seen)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await service.sources["in"].intake.submit(_entries(6))
            with trio.fail_after(30):
                await loop.wait_offset(6)
            nursery.cancel_scope.cancel()
    assert offsets == sorted(offsets) and offsets[0] >= 2
    assert sorted(e.seq for e in script.delivered) == [1, 2, 3, 4, 5, 6]


async def test_plugin_exception_is_retried_not_lost(tmp_path: Path, script: scripted.Script) -> None:
    def boom(batch: relay.Batch) -> relay.Result:
        raise RuntimeError("plugin bug")

    script.answers = [boom]
    async with running_relay(_config(tmp_path)) as service:
        await service.sources["in"].intake.submit(_entries(2))
        with trio.fail_after(30):
            await service.destinations["out"].loop.wait_offset(2)
    assert [e.seq for e in script.delivered] == [1, 2]


class _Describing(scripted.ScriptedDestination):
    type_name = "describing"

    def describe(self, batch: relay.Batch) -> dict[str, str]:
        return {"id": batch.id, "entries": str(len(batch))}


class _DescribingPlugin:
    @relay.hookimpl
    def register_destination_types(self, register):  # type: ignore[no-untyped-def]
        register(_Describing)


async def test_describe_sees_the_boundaries_that_are_recorded(tmp_path: Path, script: scripted.Script) -> None:
    """A batch cut short by max_bytes is described with its own last entry, as recorded (S3 keys use it)."""
    dest = {"type": "describing", "script": "main", "batch": {"max_entries": 100, "max_bytes": 1000,  # ~3 entries
                                                                "max_wait": "10ms"}}
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}}, {"out": dest}),
                         extra=[scripted, _DescribingPlugin()])
    async with running_relay(config) as service:
        await service.sources["in"].intake.submit(_entries(12))
        with trio.fail_after(5):
            await service.destinations["out"].loop.wait_offset(12)
    assert len(script.batches) > 1, "the byte limit cut the entries into several batches"
    for batch in script.batches:
        assert batch.attributes == {"id": batch.id, "entries": str(len(batch))}


async def test_reasons_that_echo_a_secret_are_stored_masked(tmp_path: Path, script: scripted.Script) -> None:
    """A peer's error page may quote a credential; the journal (read by `relay status` and `relay dlq` in other
    processes, out of the log scrubber's reach) must only ever hold it masked."""
    secret = relay.Secret("tok-5e1f-delivery-secret")
    script.answers = [relay.Halted(f"HTTP 403: bad token {secret.reveal()}"),
                      relay.Rejected({0: f"HTTP 413: entry too large (auth {secret.reveal()})"})]
    async with running_relay(_config(tmp_path)) as service:
        loop = service.destinations["out"].loop
        await service.sources["in"].intake.submit(_entries(2))
        with trio.fail_after(30):
            await loop.wait_state("halted")
            assert destination_row(tmp_path / "state", "out")["state_reason"] == "HTTP 403: bad token ********"
            await loop.wait_offset(2)
    [(seq, reason, _)] = dead_letters(tmp_path / "state", "out")
    assert (seq, reason) == (1, "HTTP 413: entry too large (auth ********)")
