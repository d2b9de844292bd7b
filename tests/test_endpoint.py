"""The operator's endpoint: /metrics, /healthz, /readyz on metrics.listen."""

from __future__ import annotations

import contextlib
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


async def test_a_client_that_breaks_hypercorn_loses_only_its_own_connection(tmp_path: Path) -> None:
    """Half-closing a request with an absurd Content-Length made hypercorn fail (BusyResourceError) out of
    the listener's nursery: the endpoint closed, and with it the whole relay."""
    port = free_port()
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}},
                                     {"out": {"type": "scripted", "script": "main"}},
                                     metrics={"listen": f"127.0.0.1:{port}"}), extra=[scripted])
    async with running_relay(config), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        async def break_hypercorn() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n")
            await stream.send_eof()
            with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some():
                    pass
            await stream.aclose()

        for _ in range(10):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(break_hypercorn)
        assert (await client.get("/healthz")).status_code == 200
