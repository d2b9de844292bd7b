"""The operator's endpoint: /metrics, /healthz, /readyz on metrics.listen."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from tests import scripted
from tests.helpers import config_dict, entry, free_port, make_config, running_relay


async def test_metrics_health_and_readiness(tmp_path: Path, script: scripted.Script) -> None:
    port = free_port()
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}},
                                     {"out": {"type": "scripted", "script": "main"}},
                                     metrics={"listen": f"127.0.0.1:{port}"}), extra=[scripted])
    async with running_relay(config) as service, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        await service.sources["in"].intake.submit([entry(), entry("user.created"), {"bad": "entry"}])
        with trio.fail_after(30):
            await service.destinations["out"].loop.wait_offset(2)
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        text = (await client.get("/metrics")).text
        assert (await client.get("/nope")).status_code == 404
        assert (await client.post("/metrics")).status_code == 405
    assert health.status_code == 200
    assert (ready.status_code, ready.text.strip()) == (200, "ready")
    for line in ('audit_relay_source_entries_received_total{family="api_key",source="in"}',
                 'audit_relay_source_entries_quarantined_total{source="in"}',
                 'audit_relay_destination_entries_delivered_total{destination="out"}',
                 'audit_relay_destination_backlog_entries{destination="out"} 0.0',
                 'audit_relay_destination_up{destination="out"} 1.0',
                 'audit_relay_destination_state{destination="out",state="up"} 1.0',
                 "audit_relay_journal_used_bytes ",
                 "process_resident_memory_bytes "):
        assert line in text, line
