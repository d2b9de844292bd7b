"""The running relay: journal, endpoint, delivery loops and sources, nested by lifetime.

    journal writer + metrics endpoint          (outermost: open first, closed last)
      └── delivery loops, one per destination  (stop forming batches, then a deadline for in-flight ones)
            └── sources                        (innermost: stopped first, so intake ends before delivery)
                  └── heartbeat, reloads       (sd_notify WATCHDOG/STATUS; SIGHUP)

Shutdown is an event, not an exception: when `stop` is set, intake closes at once (push sources answer
503), sources are cancelled, delivery finishes the batches in flight within `shutdown_timeout`, and the
journal commits and closes. Anything cut off is still recorded as pending and is sent first on restart.

A reload (`request_reload()`, from SIGHUP) swaps components one at a time inside the same nurseries: each
has its own cancel scope and a `done` event, so a changed destination's loop is drained like at shutdown
and started again at its committed offset, and a changed source is stopped and started again from its
committed cursor. Unchanged components are not touched. Log events: `relay_ready`, `relay_stopping`,
`relay_stopped`, `reload_requested`, `reload_problem`, `reload_rejected`, `reload_applied`,
`reload_needs_restart`, `reload_component_failed`, `source_failed`, `source_finished`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from prometheus_client.core import Metric

from relay import __version__, asgi, metrics
from relay import reload as reloading
from relay.config import Config, DestinationConfig, SourceConfig
from relay.context import Context
from relay.delivery import DeliveryLoop
from relay.destination import Destination
from relay.endpoint import endpoint_app
from relay.errors import ConfigError, JournalError, JournalUnavailable
from relay.heartbeat import STATUS_INTERVAL, Heartbeat, RateWindow, while_starting
from relay.intake import JournalIntake
from relay.journal import Journal, JournalReader, JournalStateStore
from relay.logs import configure_logging, scrub
from relay.pidfile import PidFile
from relay.retry import Backoff
from relay.sdnotify import Notifier
from relay.source import Source
from relay.workers import Workers, open_workers

__all__ = ["Service"]

log = structlog.get_logger("relay.service")


@dataclass
class RunningSource:
    config: SourceConfig
    source: Source
    intake: JournalIntake
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    running: bool = False
    finished: bool = False
    last_error: str | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class RunningDestination:
    config: DestinationConfig
    loop: DeliveryLoop
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class Service:
    def __init__(self, config: Config, *, loader: Callable[[], Config] | None = None,
                 notifier: Notifier | None = None) -> None:
        """`loader` reads the configuration again for a reload; `notifier` speaks sd_notify (silent by default)."""
        self.config = config
        self.loader = loader
        self.notifier = notifier or Notifier(None)
        self.journal = Journal(config.state_dir, max_size=config.journal.max_size,
                               retention=config.journal.retention)
        self.sources: dict[str, RunningSource] = {}
        self.destinations: dict[str, RunningDestination] = {}
        self.ready = False
        self.stopping = False
        self.endpoint_addresses: list[str] = []
        self.started_at = time.time()
        self.reloads = 0
        self._reload_wanted = trio.Event()
        self._endpoint: tuple[trio.CancelScope, trio.Event] | None = None
        self._outer: trio.Nursery | None = None
        self._delivery: trio.Nursery | None = None
        self._intake: trio.Nursery | None = None
        self._rate = RateWindow()
        self.workers = Workers(0)

    async def run(self, stop: trio.Event, *, on_ready: Callable[[Service], None] | None = None) -> None:
        pid_file = PidFile.acquire(self.config.state_dir)
        try:
            # For an import, the parse workers start first: their spawn (~0.2 s each, on other cores) then
            # overlaps the journal's opening and the components' instead of delaying the first entry.
            async with open_workers(self.config.parse_workers) as self.workers, trio.open_nursery() as nursery:
                if any(cfg.plugin.cls.parses_in_workers for cfg in self.config.sources.values()):
                    nursery.start_soon(self.workers.warm_up)
                await while_starting(self.notifier, self.journal.open, "opening the journal (see the log)")
                metrics.SNAPSHOTS.add(self._gauges)
                metrics.set_build_info(__version__)
                metrics.last_reload_successful.set(1)  # the configuration it starts with was loaded
                metrics.last_reload_success.set(time.time())
                try:
                    await self._run(stop, on_ready)
                finally:
                    metrics.SNAPSHOTS.remove(self._gauges)
                    with trio.CancelScope(shield=True):
                        await self.journal.close()
        finally:
            pid_file.release()
            log.info("relay_stopped")

    async def _run(self, stop: trio.Event, on_ready: Callable[[Service], None] | None) -> None:
        async with trio.open_nursery() as outer:
            self._outer = outer
            await outer.start(self.journal.run)
            forgotten = await self.journal.mark_removed(list(self.config.destinations))
            if forgotten:
                log.info("destinations_removed", destinations=forgotten,
                         hint="their offsets are kept for 7 days in case they come back")
            await self._start_endpoint(self.config)
            async with trio.open_nursery() as delivery:
                self._delivery = delivery
                self.journal.active_destinations = set(self.config.destinations)
                for cfg in self.config.destinations.values():
                    await delivery.start(self._run_destination, cfg)
                async with trio.open_nursery() as intake:
                    self._intake = intake
                    for source_cfg in self.config.sources.values():
                        await intake.start(self._run_source, source_cfg, True)
                    async with trio.open_nursery() as control:
                        heartbeat = Heartbeat(self.notifier, self._probe_journal, self.summary)
                        await control.start(heartbeat.run)
                        control.start_soon(self._reload_loop)
                        control.start_soon(self._housekeeping)
                        self.ready = True
                        log.info("relay_ready", sources=sorted(self.sources), destinations=sorted(self.destinations),
                                 state_dir=str(self.config.state_dir), metrics=self.endpoint_addresses)
                        self.notifier.ready(self.summary())
                        if on_ready is not None:
                            on_ready(self)
                        await stop.wait()
                        control.cancel_scope.cancel()
                    self.stopping = True
                    self.ready = False
                    self.notifier.stopping()
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

    # -- components ---------------------------------------------------------------------------------

    def _context(self, name: str, kind: str) -> Context:
        owner = f"{kind}:{name}"
        return Context(name, kind, self.config.state_dir, JournalStateStore(self.journal, owner),  # type: ignore[arg-type]
                       workers=self.workers)

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
            running.done.set()

    async def _run_source(self, cfg: SourceConfig, must_start: bool, *, task_status: trio.TaskStatus[None]) -> None:
        """Start the source, then keep it running: if it fails later it is logged and restarted with backoff
        while everything else carries on. At startup (`must_start`) a failure to start stops the relay from
        starting; after a reload the source keeps retrying instead."""
        source: Source = cfg.plugin.cls(self._context(cfg.name, "source"), cfg.settings)
        cursor, last_success = await self.journal.load_source(cfg.name)
        intake = JournalIntake(cfg.name, self.journal, cursor, last_success)
        running = RunningSource(cfg, source, intake)
        self.sources[cfg.name] = running
        backoff = Backoff(1.0, 60.0)
        started = False
        try:
            with running.scope:
                while True:
                    try:
                        await source.open()
                        async with trio.open_nursery() as nursery:
                            await nursery.start(source.run, intake)
                            running.running = True
                            if not started:
                                task_status.started()
                                started = True
                            backoff.reset()
                        running.finished = True  # run() returned: a one-off source (an import) is done
                        log.info("source_finished", source=cfg.name)
                        return
                    except Exception as exc:
                        if not started and must_start:
                            raise
                        running.last_error = scrub(f"{type(exc).__name__}: {exc}")
                        log.exception("source_failed", source=cfg.name, error=running.last_error)
                        if not started:
                            task_status.started()
                            started = True
                    finally:
                        running.running = False
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            await source.close()
                    await trio.sleep(backoff.next_delay())
        finally:
            intake.close()
            running.done.set()

    async def _stop_source(self, running: RunningSource) -> None:
        running.intake.close()
        running.scope.cancel()
        await running.done.wait()

    async def _stop_destination(self, running: RunningDestination) -> None:
        """Drain like at shutdown: no new batches, `shutdown_timeout` for those in flight (the rest stay
        recorded and are rebuilt by the next loop for this destination)."""
        running.loop.stop()
        running.scope.deadline = min(running.scope.deadline, trio.current_time() + self.config.shutdown_timeout)
        await running.done.wait()

    async def _start_endpoint(self, config: Config) -> None:
        assert self._outer is not None
        self.endpoint_addresses = []
        if not config.metrics.listen:
            return
        scope, done = trio.CancelScope(), trio.Event()
        app = endpoint_app(self._readiness)

        async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                with scope:
                    await asgi.serve(app, asgi.hypercorn_config(config.metrics.listen or ""), task_status=task_status)
            finally:
                done.set()

        self.endpoint_addresses = await self._outer.start(serve)
        self._endpoint = (scope, done)

    async def _stop_endpoint(self) -> None:
        if self._endpoint is not None:
            scope, done = self._endpoint
            self._endpoint = None
            scope.cancel()
            await done.wait()

    # -- reload -------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Ask for a reload (from a signal handler task); requests during a reload coalesce into one more."""
        self._reload_wanted.set()

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted = trio.Event()
            log.info("reload_requested", config=self.config.file)
            await self.reload()

    async def reload(self, new: Config | None = None) -> reloading.Outcome:
        """Read (unless given), validate and apply a configuration; the outcome is logged, counted and
        written to the state dir for `relay reload`."""
        self.notifier.reloading()
        self.reloads += 1
        try:
            outcome = await self._reload(new)
        finally:
            self.notifier.ready(self.summary())
        metrics.reloads.labels(outcome.result).inc()
        metrics.last_reload_successful.set(1 if outcome.result == "applied" else 0)
        if outcome.result != "rejected":
            metrics.last_reload_success.set(time.time())
        try:
            await trio.to_thread.run_sync(reloading.write_outcome, self.config.state_dir, outcome)
        except OSError as exc:
            log.warning("reload_outcome_not_written", error=str(exc))
        return outcome

    async def _reload(self, new: Config | None) -> reloading.Outcome:
        if new is None:
            if self.loader is None:
                return reloading.Outcome("rejected", self.reloads, problems=["this relay has no configuration "
                                                                              "file to read again"])
            try:
                new = await trio.to_thread.run_sync(self.loader)
            except ConfigError as exc:
                problems = [str(issue) for issue in exc.issues]
            except Exception as exc:  # a plugin that fails to load, an unreadable file
                problems = [scrub(f"{type(exc).__name__}: {exc}")]
            else:
                problems = []
            if problems:
                for problem in problems:
                    log.error("reload_problem", problem=problem)
                log.error("reload_rejected", problems=len(problems),
                          hint="still running on the previous configuration; fix the file and reload again")
                return reloading.Outcome("rejected", self.reloads, problems=problems)
        assert new is not None
        plan = reloading.plan(self.config, new)
        failures: list[str] = []
        if plan.restart_required:
            log.warning("reload_needs_restart", keys=list(plan.restart_required),
                        hint="these settings keep their running values until the relay is restarted")
        old, self.config = self.config, reloading.effective(self.config, new)
        if "log" in plan.live:
            configure_logging(new.log.level, new.log.format)
        if "metrics.listen" in plan.live:
            failures += await self._swap_endpoint(old)
        failures += await self._apply_sources(old, plan.sources)
        failures += await self._apply_destinations(old, plan.destinations)
        changes = {kind: c.as_dict() for kind, c in (("sources", plan.sources), ("destinations", plan.destinations))
                   if c}
        if plan.live:
            changes["settings"] = {"changed": list(plan.live)}
        result = "partial" if failures else "applied"
        (log.error if failures else log.info)("reload_applied", result=result, **{k: v for k, v in changes.items()},
                                              restart_required=list(plan.restart_required))
        return reloading.Outcome(result, self.reloads, problems=failures, changes=changes,
                                 restart_required=list(plan.restart_required))

    async def _swap_endpoint(self, old: Config) -> list[str]:
        await self._stop_endpoint()
        try:
            await self._start_endpoint(self.config)
            return []
        except Exception as exc:  # hypercorn raises the bind error inside an exception group
            cause = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]  # type: ignore[assignment]
            problem = f"metrics.listen: cannot listen on {self.config.metrics.listen}: {cause}"
            log.error("reload_component_failed", component="metrics", error=problem,
                      hint="keeping the previous address")
            self.config = dataclasses.replace(self.config, metrics=old.metrics)  # so the next reload tries again
            await self._start_endpoint(old)
            return [problem]

    async def _apply_sources(self, old: Config, changes: reloading.Changes) -> list[str]:
        assert self._intake is not None
        failures: list[str] = []
        for name in changes.changed:
            running, cfg = self.sources[name], self.config.sources[name]
            if cfg.type == running.config.type and await running.source.reconfigure(cfg.settings):
                running.config = cfg
                log.info("source_reconfigured", source=name, hint="applied in place, not restarted")
        restart = [n for n in changes.changed if self.sources[n].config != self.config.sources[n]]
        async with trio.open_nursery() as nursery:
            for name in (*changes.removed, *restart):
                nursery.start_soon(self._stop_source, self.sources[name])
        for name in changes.removed:
            del self.sources[name]
        intake = self._intake
        for name in (*restart, *changes.added):
            if await self._start("sources", name, old.sources.get(name), failures,
                                 lambda cfg: intake.start(self._run_source, cfg, False)):
                started = self.sources[name]
                if not (started.running or started.finished):  # it keeps retrying with backoff meanwhile
                    problem = f"source {name}: {started.last_error}; retrying with backoff"
                    log.error("reload_component_failed", component=f"source {name}", error=problem)
                    failures.append(problem)
        return failures

    async def _apply_destinations(self, old: Config, changes: reloading.Changes) -> list[str]:
        assert self._delivery is not None
        failures: list[str] = []
        async with trio.open_nursery() as nursery:
            for name in (*changes.removed, *changes.changed):
                nursery.start_soon(self._stop_destination, self.destinations[name])
        for name in changes.removed:
            del self.destinations[name]
        self.journal.active_destinations = set(self.config.destinations)
        if changes.removed:
            await self.journal.mark_removed(list(self.config.destinations))
        delivery = self._delivery
        for name in (*changes.changed, *changes.added):
            await self._start("destinations", name, old.destinations.get(name), failures,
                              lambda cfg: delivery.start(self._run_destination, cfg))
        return failures

    async def _start(self, kind: str, name: str, previous: Any, failures: list[str],
                     start: Callable[[Any], Awaitable[object]]) -> bool:
        """Start a component with its new settings; if that fails, with its `previous` ones (if any), and
        record that those are what runs, so the next reload sees the difference and tries again."""
        try:
            await start(getattr(self.config, kind)[name])
            return True
        except Exception as exc:
            component = f"{kind[:-1]} {name}"
            problem = scrub(f"{component}: {type(exc).__name__}: {exc}")
            log.error("reload_component_failed", component=component, error=problem)
            failures.append(problem)
        components = {**getattr(self.config, kind)}
        if previous is None:
            components.pop(name, None)
        else:
            components[name] = previous
        self.config = dataclasses.replace(self.config, **{kind: components})  # type: ignore[arg-type]
        if kind == "destinations":
            self.journal.active_destinations = set(components)
        if previous is not None:
            try:
                await start(previous)
            except Exception as exc:
                failures.append(scrub(f"{component}: not running: {type(exc).__name__}: {exc}"))
                log.error("reload_component_failed", component=component, error=failures[-1])
        return False

    # -- observability ------------------------------------------------------------------------------

    async def _probe_journal(self) -> None:
        """The watchdog's proof of life: a no-op write through the writer's group commit. Any answer counts
        (a full disk is reported elsewhere); a writer that is gone never answers."""
        try:
            await self.journal.write(lambda db: None, wait_for_space=False)
        except JournalUnavailable:
            if not self.journal.running:
                await trio.sleep_forever()
        except JournalError:
            pass

    async def _housekeeping(self) -> None:
        """Re-count dead letters now and then: `relay dlq replay/purge` change them from another process."""
        while True:
            await trio.sleep(STATUS_INTERVAL)
            counts = await self.journal.dead_letter_counts()
            for name, running in self.destinations.items():
                running.loop.dead_letters = counts.get(name, 0)

    def summary(self) -> str:
        """The one-line STATUS= for systemd: intake rate, destinations not up, journal use."""
        stats = self.journal.statistics()
        self._rate.add(time.monotonic(), stats.last_seq)
        down = sorted(f"{name} {r.loop.state}" for name, r in self.destinations.items() if r.loop.state != "up")
        sources_down = sorted(name for name, r in self.sources.items() if not (r.running or r.finished))
        parts = [f"{self._rate.per_minute():,.0f} entries/min in",
                 f"{len(self.destinations) - len(down)}/{len(self.destinations)} destinations up"]
        if down:
            parts[-1] += f" (down: {', '.join(down)})"
        if sources_down:
            parts.append(f"sources down: {', '.join(sources_down)}")
        parts.append(f"journal {100 * stats.used_bytes / max(1, stats.max_size):.0f}% full")
        return "; ".join(parts)

    def _readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if not self.ready:
            return False, "starting"
        down = [name for name, running in self.sources.items() if not (running.running or running.finished)]
        if down:
            return False, f"sources not running: {', '.join(sorted(down))}"
        return True, "ready"

    def _gauges(self) -> list[Metric]:
        return metrics.relay_gauges(
            self.journal.statistics(), [r.loop.snapshot() for r in self.destinations.values()],
            [metrics.SourceSnapshot(name, r.running, r.intake.last_success_at) for name, r in self.sources.items()])
