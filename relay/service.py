"""The running relay: journal, endpoint, delivery loops and sources, nested by lifetime.

    journal writer + metrics endpoint          (outermost: open first, closed last)
      └── delivery loops, one per destination  (stop forming batches, then a deadline for in-flight ones)
            └── sources                        (innermost: stopped first, so intake ends before delivery)

Shutdown is an event, not an exception: when `stop` is set, intake closes at once (push sources answer
503), sources are cancelled, delivery finishes the batches in flight within `shutdown_timeout`, and the
journal commits and closes. Anything cut off is still recorded as pending and is sent first on restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
import trio
from prometheus_client.core import GaugeMetricFamily, Metric

from relay import asgi, metrics
from relay.config import Config, DestinationConfig, SourceConfig
from relay.context import Context
from relay.delivery import DeliveryLoop
from relay.destination import Destination
from relay.endpoint import endpoint_app
from relay.intake import JournalIntake
from relay.journal import Journal, JournalReader, JournalStateStore
from relay.retry import Backoff
from relay.source import Source

__all__ = ["Service"]

log = structlog.get_logger("relay.service")
STATES = ("up", "retrying", "halted")


@dataclass
class RunningSource:
    config: SourceConfig
    source: Source
    intake: JournalIntake
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    running: bool = False
    finished: bool = False


@dataclass
class RunningDestination:
    config: DestinationConfig
    loop: DeliveryLoop
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.journal = Journal(config.state_dir, max_size=config.journal.max_size,
                               retention=config.journal.retention)
        self.sources: dict[str, RunningSource] = {}
        self.destinations: dict[str, RunningDestination] = {}
        self.ready = False
        self.stopping = False
        self.endpoint_addresses: list[str] = []
        self.started_at = time.time()

    async def run(self, stop: trio.Event, *, on_ready: Callable[[Service], None] | None = None) -> None:
        await self.journal.open()
        metrics.SNAPSHOTS.add(self._gauges)
        try:
            async with trio.open_nursery() as outer:
                await outer.start(self.journal.run)
                if self.config.metrics.listen:
                    config = asgi.hypercorn_config(self.config.metrics.listen)
                    self.endpoint_addresses = await outer.start(asgi.serve, endpoint_app(self._readiness), config)
                async with trio.open_nursery() as delivery:
                    for cfg in self.config.destinations.values():
                        await delivery.start(self._run_destination, cfg)
                    self.journal.active_destinations = set(self.destinations)
                    async with trio.open_nursery() as intake:
                        for source_cfg in self.config.sources.values():
                            await intake.start(self._run_source, source_cfg)
                        self.ready = True
                        log.info("relay_ready", sources=sorted(self.sources), destinations=sorted(self.destinations),
                                 state_dir=str(self.config.state_dir), metrics=self.endpoint_addresses)
                        if on_ready is not None:
                            on_ready(self)
                        await stop.wait()
                        self.stopping = True
                        self.ready = False
                        log.info("relay_stopping", shutdown_timeout=self.config.shutdown_timeout)
                        for running in self.sources.values():
                            running.intake.close()
                        intake.cancel_scope.cancel()
                    for running_destination in self.destinations.values():
                        running_destination.loop.stop()
                    delivery.cancel_scope.deadline = trio.current_time() + self.config.shutdown_timeout
                if delivery.cancel_scope.cancelled_caught:
                    log.warning("shutdown_timeout_reached",
                                hint="batches still in flight are recorded and will be sent first on restart")
                outer.cancel_scope.cancel()
        finally:
            metrics.SNAPSHOTS.remove(self._gauges)
            with trio.CancelScope(shield=True):
                await self.journal.close()
            log.info("relay_stopped")

    # -- components ---------------------------------------------------------------------------------

    def _context(self, name: str, kind: str) -> Context:
        owner = f"{kind}:{name}"
        return Context(name, kind, self.config.state_dir, JournalStateStore(self.journal, owner))  # type: ignore[arg-type]

    async def _run_destination(self, cfg: DestinationConfig, *, task_status: trio.TaskStatus[None]) -> None:
        destination: Destination = cfg.plugin.cls(self._context(cfg.name, "destination"), cfg.settings)
        reader = JournalReader(self.config.state_dir)
        loop = DeliveryLoop(cfg, destination, self.journal, reader)
        running = RunningDestination(cfg, loop)
        self.destinations[cfg.name] = running
        try:
            with running.scope:
                await loop.run(task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await destination.close()
                await reader.close()

    async def _run_source(self, cfg: SourceConfig, *, task_status: trio.TaskStatus[None]) -> None:
        """Start the source (failures here stop the relay from starting), then keep it running: if it
        fails later it is logged and restarted with backoff while everything else carries on."""
        source: Source = cfg.plugin.cls(self._context(cfg.name, "source"), cfg.settings)
        intake = JournalIntake(cfg.name, self.journal, await self.journal.load_cursor(cfg.name))
        running = RunningSource(cfg, source, intake)
        self.sources[cfg.name] = running
        backoff = Backoff(1.0, 60.0)
        first = True
        try:
            with running.scope:
                while True:
                    try:
                        await source.open()
                        async with trio.open_nursery() as nursery:
                            await nursery.start(source.run, intake)
                            running.running = True
                            if first:
                                task_status.started()
                                first = False
                            backoff.reset()
                        running.finished = True  # run() returned: a one-off source (an import) is done
                        log.info("source_finished", source=cfg.name)
                        return
                    except Exception as exc:
                        if first:
                            raise
                        log.exception("source_failed", source=cfg.name, error=f"{type(exc).__name__}: {exc}")
                    finally:
                        running.running = False
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            await source.close()
                    await trio.sleep(backoff.next_delay())
        finally:
            intake.close()

    # -- observability ------------------------------------------------------------------------------

    def _readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if not self.ready:
            return False, "starting"
        down = [name for name, running in self.sources.items() if not (running.running or running.finished)]
        if down:
            return False, f"sources not running: {', '.join(sorted(down))}"
        return True, "ready"

    def _gauges(self) -> Iterable[Metric]:
        stats = self.journal.statistics()
        used = GaugeMetricFamily("audit_relay_journal_used_bytes", "Bytes the journal holds (entries, "
                                 "dead letters, quarantine, indexes).", value=stats.used_bytes)
        limit = GaugeMetricFamily("audit_relay_journal_max_bytes", "journal.max_size.", value=stats.max_size)
        full = GaugeMetricFamily("audit_relay_journal_full", "1 while sources are paused because the journal "
                                 "is full.", value=1 if stats.full or stats.disk_full else 0)
        last = GaugeMetricFamily("audit_relay_journal_last_sequence", "Sequence number of the newest entry.",
                                 value=stats.last_seq)
        backlog = GaugeMetricFamily("audit_relay_destination_backlog_entries",
                                    "Journaled entries the destination has not finished yet.", labels=["destination"])
        up = GaugeMetricFamily("audit_relay_destination_up", "1 when the last attempt succeeded.",
                               labels=["destination"])
        state = GaugeMetricFamily("audit_relay_destination_state", "1 for the destination's current state.",
                                  labels=["destination", "state"])
        for name, running in self.destinations.items():
            snap = running.loop.snapshot()
            backlog.add_metric([name], snap.backlog)
            up.add_metric([name], 1 if snap.state == "up" else 0)
            for candidate in STATES:
                state.add_metric([name, candidate], 1 if snap.state == candidate else 0)
        source_up = GaugeMetricFamily("audit_relay_source_up", "1 while the source is running.", labels=["source"])
        for name, running_source in self.sources.items():
            source_up.add_metric([name], 1 if running_source.running else 0)
        return [used, limit, full, last, backlog, up, state, source_up]

