"""Source `demo`: realistic audit entries at a steady rate, for trying the relay and for benchmarks.

Entries are drawn from the real entry types of incident.io's audit log (the catalog shipped in
`relay/data`), with all six actor types, versions 1 and 2, fresh ids, the current time and varied
context. The cursor counts entries produced, so `count` holds across restarts.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import trio
from pydantic import Field

import relay
from relay.catalog import load_catalog

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_NAMES = ["Kelsey Mills", "Ravi Patel", "Ana Souza", "Jonas Weber", "Mei Lin", "Tomás García", "Aisha Bello",
          "Chris O'Neill", "Sofia Rossi", "Yuki Tanaka", "Lars Nilsson", "Priya Sharma"]
_ROLES = ["owner", "admin", "responder", "viewer"]
_CUSTOM_ROLES = ["", "engineering", "security", "engineering,security", "data", "support,engineering"]
_AGENTS = ["Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15",
           "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0.0.0 Safari/537.36",
           "incident-io-terraform/5.4.0", "Slack-Bot/1.0", "python-httpx/0.27.0", "curl/8.5.0"]
_SYSTEMS = [("incident_setup", "incident.io (setup)"), ("slack", "Slack"), ("scim", "SCIM provisioning"),
            ("retention", "incident.io (data retention)")]
_ALERT_NAMES = ["Staging: pod CPU high", "Prod: 5xx rate above 2%", "Payments latency p99 > 800ms"]
_WORKFLOWS = ["Auto-invite security team to private incidents", "Page on-call for SEV1", "Close stale follow-ups"]
_ACTOR_WEIGHTS = [("user", 55), ("api_key", 17), ("workflow", 10), ("system", 8), ("alert", 5),
                  ("external_resource", 5)]


class DemoSettings(relay.Settings):
    rate: float = Field(default=1.0, gt=0, le=1_000_000)
    """Entries per second."""
    count: int | None = Field(default=None, gt=0)
    """Stop after this many entries in total (across restarts); unlimited if unset."""
    seed: int | None = None
    """Make the sequence of entry types and actors repeatable (ids and times still vary)."""


class DemoSource(relay.Source):
    type_name = "demo"
    Settings = DemoSettings
    settings: DemoSettings

    async def open(self) -> None:
        catalog = load_catalog()
        self._templates = [orjson.dumps(t["example"]) for t in catalog["entry_types"]]
        self._actor_types = [a for a, _ in _ACTOR_WEIGHTS]
        self._weights = [w for _, w in _ACTOR_WEIGHTS]

    async def run(self, intake: relay.Intake, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        produced = int(intake.cursor or 0)
        rng = random.Random(f"{self.settings.seed}:{produced}" if self.settings.seed is not None else None)
        task_status.started()
        rate, limit = self.settings.rate, self.settings.count
        chunk = max(1, min(1000, int(rate / 10)))
        started, base = trio.current_time(), produced
        while limit is None or produced < limit:
            due = base + int((trio.current_time() - started) * rate)
            if due <= produced:
                await trio.sleep_until(started + (produced - base + 1) / rate)
                continue
            n = min(due - produced, chunk, (limit - produced) if limit else chunk)
            entries = [self.make_entry(rng) for _ in range(n)]
            await intake.wait_writable()
            try:
                await intake.submit(entries, cursor=str(produced + n))
            except relay.JournalUnavailable as exc:
                await trio.sleep(min(exc.retry_after, 1.0))
                continue
            produced += n
        self.log.info("demo_finished", produced=produced)

    def make_entry(self, rng: random.Random) -> dict[str, Any]:
        template: dict[str, Any] = orjson.loads(rng.choice(self._templates))
        now = time.time()
        entry = {"id": _ulid(rng, now), **template}  # as in the audit log: each entry's own id, first
        entry["occurred_at"] = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        entry["actor"] = self._actor(rng, rng.choices(self._actor_types, self._weights)[0])
        for target in entry.get("targets") or []:
            target["id"] = _ulid(rng, now)
        entry["context"] = {"location": f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
                                        f"{rng.randint(1, 254)}", "user_agent": rng.choice(_AGENTS)}
        return entry

    def _actor(self, rng: random.Random, kind: str) -> dict[str, Any]:
        ulid = _ulid(rng, time.time() - rng.randint(0, 10**8))
        if kind == "user":
            return {"type": "user", "id": ulid, "name": rng.choice(_NAMES),
                    "metadata": {"user_base_role_slug": rng.choice(_ROLES),
                                 "user_custom_role_slugs": rng.choice(_CUSTOM_ROLES)}}
        if kind == "api_key":
            return {"type": "api_key", "id": ulid, "name": f"{rng.choice(_NAMES).split()[0]}'s automation key",
                    "metadata": {"api_key_roles": rng.choice(["incident_creator", "global_access",
                                                              "incident_creator,global_access"])}}
        if kind == "system":
            system_id, name = rng.choice(_SYSTEMS)
            return {"type": "system", "id": system_id, "name": name, "metadata": {}}
        if kind == "workflow":
            return {"type": "workflow", "id": ulid, "name": rng.choice(_WORKFLOWS), "metadata": {}}
        if kind == "alert":
            return {"type": "alert", "id": ulid, "name": rng.choice(_ALERT_NAMES),
                    "metadata": {"alert_source_id": _ulid(rng, time.time() - 10**7)}}
        return {"type": "external_resource", "id": ulid, "name": f"#{rng.randint(100, 9999)} Increased API latency",
                "metadata": {"external_resource_type": "pager_duty_incident",
                             "external_resource_external_id": f"q{rng.randint(1000, 99999)}"}}


def _ulid(rng: random.Random, at: float) -> str:
    return ulid(int(at * 1000), rng.getrandbits(80))


def ulid(millis: int, randomness: int) -> str:
    """A ULID's text: 48 bits of milliseconds, then 80 of `randomness`, in Crockford's base 32."""
    value = millis << 80 | randomness
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


@relay.hookimpl
def register_source_types(register):  # type: ignore[no-untyped-def]
    register(DemoSource)
