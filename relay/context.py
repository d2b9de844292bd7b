"""What the core hands each source and destination instance: its name, a logger, durable state, metrics.

Plugins get this instead of the journal or the plugin manager, so they cannot reach past their own job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from relay import metrics
from relay.workers import Workers

__all__ = ["CheckFailed", "Context", "StateStore"]


class StateStore(Protocol):
    """Small durable key-value store scoped to one plugin instance (kept in the journal)."""

    async def load(self, key: str) -> str | None: ...

    async def save(self, key: str, value: str) -> None: ...


class MemoryStateStore:
    """A `StateStore` for tests and for `relay check`, where nothing may be written."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def load(self, key: str) -> str | None:
        return self.values.get(key)

    async def save(self, key: str, value: str) -> None:
        self.values[key] = value


class CheckFailed(Exception):
    """Raised by `check()` with a message that says what failed (never a secret)."""


@dataclass
class Context:
    name: str
    kind: Literal["source", "destination"]
    state_dir: Path
    state: StateStore = field(default_factory=MemoryStateStore)
    log: Any = None
    workers: Workers = field(default_factory=Workers)
    """Where to parse and validate large input (`await context.workers.run(fn, *args)`): the relay's
    worker processes (`parse_workers`), so the work runs on another core than the event loop."""

    def __post_init__(self) -> None:
        if self.log is None:
            self.log = structlog.get_logger(f"relay.{self.kind}").bind(**{self.kind: self.name})

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Any:
        """A counter `audit_relay_<name>` labelled with this instance's name (and `labelnames`)."""
        metric = metrics.plugin_metric("counter", name, documentation, self.kind, labelnames)
        return metric.labels(self.name) if not labelnames else _Bound(metric, self.name)

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Any:
        metric = metrics.plugin_metric("gauge", name, documentation, self.kind, labelnames)
        return metric.labels(self.name) if not labelnames else _Bound(metric, self.name)

    def histogram(
        self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] | None = None,
    ) -> Any:
        metric = metrics.plugin_metric("histogram", name, documentation, self.kind, labelnames, buckets)
        return metric.labels(self.name) if not labelnames else _Bound(metric, self.name)


class _Bound:
    """A labelled metric with the instance label already filled in."""

    def __init__(self, metric: Any, name: str) -> None:
        self._metric = metric
        self._name = name

    def labels(self, *values: str) -> Any:
        return self._metric.labels(self._name, *values)
