"""Shared pieces of the splunk_hec tests: the token, entries, a destination factory, log capture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

import relay
from relay.context import MemoryStateStore
from relay.entry import parse_occurred_at
from relay_plugins.splunk_hec import SplunkHecDestination, SplunkHecSettings
from tests.helpers import entry

TOKEN = "5f0c2d1e-hec-TOKEN-must-never-be-logged-8a7b"
"""Distinctive, so a search of captured output for it cannot match anything else."""
ACK_TOKEN = "9e8d7c6b-ack-TOKEN-must-never-be-logged-1f2e"


def stamp(i: int) -> str:
    """A distinct `occurred_at` per entry: the tests identify entries by it."""
    return f"2024-05-14T09:{i // 60 % 60:02d}:{i % 60:02d}.{i:06d}Z"


def entries(n: int, start: int = 0, **extra: Any) -> list[dict[str, Any]]:
    return [entry(occurred_at=stamp(i), **extra) for i in range(start, start + n)]


def batch_of(values: list[dict[str, Any]], first_seq: int = 1) -> relay.Batch:
    items = [relay.Entry(first_seq + i, orjson.dumps(v), parse_occurred_at(v["occurred_at"]), v["action"])
             for i, v in enumerate(values)]
    return relay.Batch("hec", items[0].seq, items[-1].seq, items)


def destination(tmp_path: Path, url: str, *, token: str = TOKEN, state: MemoryStateStore | None = None,
                transport: Any = None, **settings: Any) -> SplunkHecDestination:
    context = relay.Context("hec", "destination", tmp_path, state or MemoryStateStore())
    dest = SplunkHecDestination(context, SplunkHecSettings(url=url, token=token, **settings))
    dest.transport = transport
    return dest


@dataclass
class Captured:
    """Everything logged during a test: structlog event dicts (before any scrubbing) and stdlib records."""

    events: list[dict[str, Any]]
    caplog: pytest.LogCaptureFixture

    def text(self) -> str:
        lines = [repr(e) for e in self.events]
        lines += [f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in self.caplog.records]
        return "\n".join(lines)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


def no_token(*texts: object) -> bool:
    return all(TOKEN not in str(t) and ACK_TOKEN not in str(t) for t in texts)
