"""Prometheus metrics: counters kept by the loops, gauges computed at scrape time from snapshots.

Every name starts with `audit_relay_` and uses base units. Labels are bounded: source and destination
names come from the configuration, action families from the documented catalog (others count as
`other`); never entry ids or free text. `docs/monitoring.md` lists them all with the questions they
answer; `relay_gauges()` is where the "how far behind" ones are computed.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from relay.delivery import DestinationSnapshot
    from relay.journal import JournalStats

_STARTED = time.time()


class _ProcessCollector(ProcessCollector):
    """`process_*` metrics also under systemd's `ProcSubset=pid`, which hides `/proc/stat` (the boot time)."""

    def _boot_time(self) -> float:
        try:
            return float(super()._boot_time())  # type: ignore[no-untyped-call]
        except OSError:
            # Boot time = our start (measured at import) minus our age since boot (in /proc/self/stat).
            with open(f"{self._proc}/self/stat", "rb") as stat:
                ticks = float(stat.read().split(b")")[-1].split()[19])
            return _STARTED - ticks / self._ticks


REGISTRY = CollectorRegistry()
_ProcessCollector(registry=REGISTRY)

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
reloads = Counter(f"{PREFIX}config_reloads", "Configuration reloads, by result (applied, partial, rejected).",
                  ["result"], registry=REGISTRY)
for _result in ("applied", "partial", "rejected"):
    reloads.labels(_result)  # present at 0 from the start, so increase() sees the first one
parse_workers = Gauge(f"{PREFIX}parse_workers",
                      "Worker processes that parse and validate large input (0: on the event loop, by configuration "
                      "or because workers failed to start; see the log).", registry=REGISTRY)
last_reload_successful = Gauge(f"{PREFIX}config_last_reload_successful",
                               "1 if the newest reload was applied (or none was asked for), 0 if it was not.",
                               registry=REGISTRY)
last_reload_success = Gauge(f"{PREFIX}config_last_reload_success_timestamp_seconds",
                            "When the running configuration was loaded (start or reload).", registry=REGISTRY)
build_info = Info(f"{PREFIX}build", "The running audit-relay's version.", registry=REGISTRY)
batch_entries = Histogram(
    f"{PREFIX}destination_batch_entries", "Entries per batch handed to the destination.", ["destination"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000), registry=REGISTRY)


def set_build_info(version: str) -> None:
    build_info.info({"version": version, "python": platform.python_version()})


@dataclass(frozen=True)
class SourceSnapshot:
    name: str
    running: bool
    last_success_at: float | None


STATES = ("up", "retrying", "halted")


def relay_gauges(stats: JournalStats, destinations: Sequence[DestinationSnapshot],
                 sources: Sequence[SourceSnapshot], now: float | None = None) -> list[Metric]:
    """Every gauge computed at scrape time, from in-memory snapshots (never a SQLite query)."""
    now = time.time() if now is None else now

    def family(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=labels)

    used = family("journal_used_bytes", "Bytes the journal holds (entries, dead letters, quarantine, indexes).")
    used.add_metric([], stats.used_bytes)
    limit = family("journal_max_bytes", "journal.max_size: sources pause at this size.")
    limit.add_metric([], stats.max_size)
    full = family("journal_full", "1 while sources are paused because the journal (or its disk) is full.")
    full.add_metric([], 1 if stats.full or stats.disk_full else 0)
    last = family("journal_last_sequence", "Sequence number of the newest entry.")
    last.add_metric([], stats.last_seq)

    d = ["destination"]
    backlog = family("destination_backlog_entries", "Journaled entries the destination has not finished yet.", d)
    offset = family("destination_offset", "Sequence number up to which the destination has finished.", d)
    in_flight = family("destination_batches_in_flight", "Batches handed to the destination and not finished.", d)
    up = family("destination_up", "1 when the last attempt succeeded.", d)
    state = family("destination_state", "1 for the destination's current state (up, retrying, halted).",
                   ["destination", "state"])
    lag = family("destination_lag_seconds", "Now minus the occurred_at of the newest entry delivered: how fresh "
                 "the destination's data is (absent until it has delivered one).", d)
    success = family("destination_last_success_timestamp_seconds", "When the destination last accepted entries.", d)
    oldest = family("destination_oldest_undelivered_age_seconds", "Now minus the occurred_at of the oldest entry "
                    "the destination has not finished (the one right after its offset); 0 when caught up.", d)
    dead = family("destination_dead_letters", "Entries in the destination's dead-letter store now.", d)
    for snap in destinations:
        labels = [snap.name]
        backlog.add_metric(labels, snap.backlog)
        offset.add_metric(labels, snap.offset)
        in_flight.add_metric(labels, snap.in_flight)
        up.add_metric(labels, 1 if snap.state == "up" else 0)
        for candidate in STATES:
            state.add_metric([snap.name, candidate], 1 if snap.state == candidate else 0)
        if snap.newest_delivered_occurred_at is not None:
            lag.add_metric(labels, max(0.0, now - snap.newest_delivered_occurred_at))
        if snap.last_success_at is not None:
            success.add_metric(labels, snap.last_success_at)
        undelivered = snap.oldest_undelivered_occurred_at
        oldest.add_metric(labels, max(0.0, now - undelivered) if undelivered is not None and snap.backlog else 0.0)
        dead.add_metric(labels, snap.dead_letters)

    s = ["source"]
    source_up = family("source_up", "1 while the source is running.", s)
    source_success = family("source_last_success_timestamp_seconds",
                            "When the source last committed a submit (a poll that found nothing new counts).", s)
    for src in sources:
        source_up.add_metric([src.name], 1 if src.running else 0)
        if src.last_success_at is not None:
            source_success.add_metric([src.name], src.last_success_at)
    return [used, limit, full, last, backlog, offset, in_flight, up, state, lag, success, oldest, dead,
            source_up, source_success]


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
