"""Prometheus metrics: counters kept by the loops, gauges computed at scrape time from snapshots.

Every name starts with `audit_relay_` and uses base units. Labels are bounded: source and destination
names come from the configuration, action families from the documented catalog (others count as
`other`); never entry ids or free text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from relay.catalog import known_versions

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

PREFIX = "audit_relay_"

source_received = Counter(
    f"{PREFIX}source_entries_received", "Entries newly journaled, per source and action family.",
    ["source", "family"], registry=REGISTRY)
source_duplicates = Counter(
    f"{PREFIX}source_entries_duplicate", "Entries the journal already held (deduplicated).", ["source"],
    registry=REGISTRY)
source_quarantined = Counter(
    f"{PREFIX}source_entries_quarantined",
    "Invalid entries and unparseable bodies kept in the quarantine store.", ["source"], registry=REGISTRY)
source_unrecognized = Counter(
    f"{PREFIX}source_entries_unrecognized",
    "Entries relayed unchanged with something not in the documented schema (kind: action, version, "
    "actor_type, field).", ["source", "kind"], registry=REGISTRY)
source_rejected_requests = Counter(
    f"{PREFIX}source_requests_refused", "Requests or polls refused because the journal could not take them.",
    ["source", "reason"], registry=REGISTRY)

delivered = Counter(f"{PREFIX}destination_entries_delivered", "Entries delivered.", ["destination"],
                    registry=REGISTRY)
dead_lettered = Counter(f"{PREFIX}destination_entries_dead_lettered",
                        "Entries the destination refused, kept in the dead-letter store.", ["destination"],
                        registry=REGISTRY)
filtered = Counter(f"{PREFIX}destination_entries_filtered",
                   "Entries skipped by the destination's filter.", ["destination"], registry=REGISTRY)
retries = Counter(f"{PREFIX}destination_retries", "Failed attempts that will be retried, by outcome.",
                  ["destination", "outcome"], registry=REGISTRY)
send_duration = Histogram(
    f"{PREFIX}destination_send_duration_seconds", "Duration of one delivery attempt.", ["destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=REGISTRY)
batch_entries = Histogram(
    f"{PREFIX}destination_batch_entries", "Entries per batch handed to the destination.", ["destination"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000), registry=REGISTRY)


@cache
def _families() -> frozenset[str]:
    return frozenset(action.split(".", 1)[0] for action in known_versions())


def action_family(action: str) -> str:
    """`api_key.created` -> `api_key`; families not in the catalog become `other` (bounded labels)."""
    family = action.split(".", 1)[0]
    return family if family in _families() else "other"


class SnapshotCollector(Collector):
    """Gauges computed at scrape time by functions that read in-memory snapshots (never SQLite)."""

    def __init__(self) -> None:
        self._providers: list[Callable[[], Iterable[Metric]]] = []

    def add(self, provider: Callable[[], Iterable[Metric]]) -> None:
        self._providers.append(provider)

    def remove(self, provider: Callable[[], Iterable[Metric]]) -> None:
        if provider in self._providers:
            self._providers.remove(provider)

    def collect(self) -> Iterable[Metric]:
        for provider in list(self._providers):
            yield from provider()


SNAPSHOTS = SnapshotCollector()
REGISTRY.register(SNAPSHOTS)

_plugin_metrics: dict[str, Any] = {}


def plugin_metric(kind: str, name: str, documentation: str, instance_kind: str, labelnames: tuple[str, ...],
                  buckets: tuple[float, ...] | None = None) -> Any:
    """A metric `audit_relay_<name>` for plugins, created once per process and labelled by instance."""
    full = f"{PREFIX}{name}"
    metric = _plugin_metrics.get(full)
    if metric is None:
        labels = [instance_kind, *labelnames]
        if kind == "counter":
            metric = Counter(full.removesuffix("_total"), documentation, labels, registry=REGISTRY)
        elif kind == "gauge":
            metric = Gauge(full, documentation, labels, registry=REGISTRY)
        elif kind == "histogram":
            metric = Histogram(full, documentation, labels, registry=REGISTRY,
                               buckets=buckets or Histogram.DEFAULT_BUCKETS)
        else:
            raise ValueError(f"unknown metric kind {kind!r}")
        _plugin_metrics[full] = metric
    return metric
