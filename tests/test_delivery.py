"""The delivery loop: retries, halts, dead letters, filters and ordered offsets, through the whole relay."""

from __future__ import annotations

from pathlib import Path

import trio

import relay
from relay.config import Config
from tests import scripted
from tests.helpers import config_dict, destination_row, entry, make_config, metric_value, running_relay


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
        with trio.fail_after(5):
            await service.destinations["out"].loop.wait_offset(5)
    assert len(script.batches) == 4
    assert {b.id for b in script.batches} == {script.batches[0].id}, "a retried batch keeps its identity"
    assert [b.attempt for b in script.batches] == [1, 2, 3, 4]
    assert destination_row(tmp_path / "state", "out")["offset"] == 5
    assert metric_value("audit_relay_destination_retries_total", destination="out", outcome="retry") \
        - retries_before == 3
    assert metric_value("audit_relay_destination_entries_delivered_total", destination="out") - delivered_before == 5
