"""One delivery loop per destination: batches from its own offset, retries, dead letters, ordered commits.

The loop records each batch's boundaries before the first attempt, so after a crash the same batch (same
entries, same `id`) is rebuilt and sent first. Up to `concurrency` batches are in flight; the offset only
moves over a contiguous run of finished batches, so order of commits is preserved and nothing is skipped.

For the "how far behind" metrics the loop keeps, in memory and cheap to read at scrape time: when it last
delivered and the newest `occurred_at` delivered (both loaded from the journal at start, so they are right
straight after a restart), the `occurred_at` of the entry right after its offset (the oldest it has not
finished; re-read whenever the offset moves), and how many dead letters it holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
import trio

from relay import metrics
from relay.config import DestinationConfig
from relay.destination import Batch, Delivered, Destination, Entry, Halted, Rejected, Result, RetryLater
from relay.errors import JournalUnavailable
from relay.journal import Journal, JournalReader, Row
from relay.logs import scrub
from relay.retry import Backoff
from relay.selection import Selection

__all__ = ["DeliveryLoop", "DestinationSnapshot"]

IDLE_POLL = 5.0
"""How often an idle loop looks for entries written by another process (`relay dlq replay`)."""


@dataclass(frozen=True)
class DestinationSnapshot:
    name: str
    type: str
    state: str
    reason: str | None
    offset: int
    backlog: int
    in_flight: int
    last_success_at: float | None
    newest_delivered_occurred_at: float | None
    oldest_undelivered_occurred_at: float | None
    dead_letters: int = 0


class DeliveryLoop:
    def __init__(self, config: DestinationConfig, destination: Destination, journal: Journal,
                 reader: JournalReader) -> None:
        self.config = config
        self.name = config.name
        self.destination = destination
        self.journal = journal
        self.reader = reader
        self.selection = Selection(config.name, config.delivery.filter, config.delivery.drop_fields)
        self.log = structlog.get_logger("relay.delivery").bind(destination=config.name)
        self.state = "starting"
        self.reason: str | None = None
        self._state_version = 0
        self._state_writes = 0
        self._state_recorded = True
        """False until the journal holds `state` (and while its disk is full, when that write is refused)."""
        self.offset = 0
        self.in_flight = 0
        self.last_success_at: float | None = None
        self.newest_delivered: float | None = None
        self.oldest_undelivered: float | None = None
        """`occurred_at` of the entry right after the offset; None when there is none."""
        self.dead_letters = 0
        self._slots = trio.Semaphore(config.concurrency)
        self._stop = trio.Event()
        self._changed = trio.Event()
        self._m_delivered = metrics.delivered.labels(self.name)
        self._m_dead = metrics.dead_lettered.labels(self.name)
        self._m_filtered = metrics.filtered.labels(self.name)
        self._m_duration = metrics.send_duration.labels(self.name)
        self._m_batch = metrics.batch_entries.labels(self.name)

    def snapshot(self) -> DestinationSnapshot:
        return DestinationSnapshot(
            self.name, self.config.type, self.state, self.reason, self.offset,
            max(0, self.journal.last_seq - self.offset), self.in_flight, self.last_success_at,
            self.newest_delivered, self.oldest_undelivered, self.dead_letters)

    async def wait_offset(self, at_least: int) -> None:
        """Return once the committed offset has reached `at_least`."""
        while self.offset < at_least:
            await self._changed.wait()

    async def wait_state(self, state: str) -> None:
        """Return once the destination is in `state` (and it is recorded in the journal)."""
        while self.state != state or not self._state_recorded:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def stop(self) -> None:
        """Form no new batches; batches in flight carry on (the caller bounds them with a deadline)."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.offset, pending = await self.journal.register_destination(self.name, self.config.delivery.start_at)
        self.last_success_at, self.newest_delivered, self.dead_letters = await self.journal.load_destination(self.name)
        await self._refresh_head(self.offset)
        task_status.started()
        await self._open()
        if self._stop.is_set():
            return
        async with trio.open_nursery() as nursery:
            after = self.offset
            for record in pending:
                after = record.last_seq
                if record.done:
                    continue
                rows = await self.reader.read_range(record.first_seq, record.last_seq)
                batch, _ = self._form(rows, record.first_seq, record.last_seq, record.attributes)
                await self._slots.acquire()
                nursery.start_soon(self._deliver, batch)
                self.log.info("batch_resumed", batch=batch.id, entries=len(batch))
            while not self._stop.is_set():
                await self._slots.acquire()
                waited = await self._wait_rows(after)
                if waited is None:
                    self._slots.release()
                    break
                first, last = waited[0][0], waited[-1][0]
                batch, rows_used = self._form(waited, first, last, None)
                last = rows_used[-1][0]
                after = last
                if not batch.entries:
                    self._slots.release()
                    self._m_filtered.inc(len(rows_used))
                    moved = await self.journal.record_batch(self.name, first, last, {}, done=True)
                    await self._moved(moved)
                    continue
                formed = Batch(self.name, first, last, batch.entries)  # boundaries as recorded, after the cut
                batch = Batch(self.name, first, last, batch.entries, self.destination.describe(formed))
                await self.journal.record_batch(self.name, first, last, dict(batch.attributes))
                self._m_filtered.inc(len(rows_used) - len(batch.entries))
                nursery.start_soon(self._deliver, batch)

    async def _open(self) -> None:
        """Open the destination, retrying with backoff until it opens or the loop is told to stop."""
        backoff = Backoff(self.config.delivery.retry.initial_backoff, self.config.delivery.retry.max_backoff)
        while True:
            try:
                await self.destination.open()
                await self._set_state("up", None)
                return
            except Exception as exc:
                self.log.error("destination_open_failed", error=f"{type(exc).__name__}: {exc}")
                await self._set_state("retrying", f"open failed: {exc}")
                if await self._stopped_within(backoff.next_delay()):
                    return

    async def _stopped_within(self, delay: float) -> bool:
        """Sleep for `delay`, or less if the loop is told to stop; True if it was."""
        with trio.move_on_after(delay):
            await self._stop.wait()
            return True
        return False

    async def _wait_rows(self, after: int) -> list[Row] | None:
        """Rows after `after` once a batch is worth sending (full, or `max_wait` passed); None on stop."""
        limits = self.config.batch
        deadline: float | None = None
        while not self._stop.is_set():
            rows = await self.reader.read_after(after, limits.max_entries)
            if rows:
                if self.oldest_undelivered is None and after == self.offset:
                    self.oldest_undelivered = rows[0][2]
                full = len(rows) >= limits.max_entries or sum(len(r[1]) for r in rows) >= limits.max_bytes
                now = trio.current_time()
                deadline = deadline if deadline is not None else now + limits.max_wait
                if full or now >= deadline:
                    return rows
                wait_until = deadline
                newest = rows[-1][0]
            else:
                wait_until = trio.current_time() + IDLE_POLL
                newest = after
            with trio.move_on_at(wait_until):
                async with trio.open_nursery() as nursery:
                    async def stopped() -> None:
                        await self._stop.wait()
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(stopped)
                    await self.journal.wait_appended(newest)
                    nursery.cancel_scope.cancel()
        return None

    def _form(self, rows: list[Row], first: int, last: int,
              attributes: dict[str, str] | None) -> tuple[Batch, list[Row]]:
        """The batch for `rows`: selected entries up to the byte limit (always at least one row)."""
        max_bytes = self.config.batch.max_bytes if attributes is None else None
        if self.selection.takes_all and (max_bytes is None or sum(len(row[1]) for row in rows) <= max_bytes):
            name = self.name
            entries = [Entry(seq, data, occurred_at, action, actor_type)
                       for seq, data, occurred_at, action, actor_type, route, _ in rows
                       if route is None or route == name]
            return Batch(name, first, last, entries, attributes or {}), rows
        entries = []
        used: list[Row] = []
        size = 0
        for row in rows:
            seq, data, occurred_at, action, actor_type, route, target_types = row
            if self.selection.takes(route, action, actor_type, target_types):
                data = self.selection.transform(data)
                if max_bytes is not None and entries and size + len(data) > max_bytes:
                    break
                size += len(data)
                entries.append(Entry(seq, data, occurred_at, action, actor_type))
            used.append(row)
        return Batch(self.name, first, last, entries, attributes or {}), used

    async def _deliver(self, batch: Batch) -> None:
        self.in_flight += 1
        try:
            await self._deliver_until_done(batch)
        finally:
            self.in_flight -= 1
            self._slots.release()

    async def _deliver_until_done(self, batch: Batch) -> None:
        retry = self.config.delivery.retry
        backoff = Backoff(retry.initial_backoff, retry.max_backoff)
        attempt = 1
        while True:
            if not batch.entries:  # a resumed batch whose entries the filter no longer takes
                await self._finish(batch, [], {})
                return
            batch = Batch(self.name, batch.first_seq, batch.last_seq, batch.entries, batch.attributes, attempt)
            result = await self._attempt(batch)
            if isinstance(result, Delivered):
                await self._finish(batch, range(len(batch)), {})
                return
            if isinstance(result, Rejected):
                cut = len(batch) if result.resend_from is None else max(0, min(result.resend_from, len(batch)))
                reasons = {i: r for i, r in result.reasons.items() if 0 <= i < cut}
                delivered = [i for i in range(cut) if i not in reasons]
                if cut >= len(batch):
                    self._log_rejected(batch, reasons, 0)
                    await self._finish(batch, delivered, reasons)
                    return
                if cut > 0 or reasons:
                    self._log_rejected(batch, reasons, len(batch) - cut)
                    rest = batch.entries[cut:]
                    await self._finish(batch, delivered, reasons, resend_from=rest[0].seq)
                    batch = Batch(self.name, rest[0].seq, batch.last_seq, rest, batch.attributes)
                    attempt = 1
                    continue
                result = RetryLater("the receiver accepted none of the batch and asked for it again")
            attempt += 1
            if isinstance(result, Halted):
                metrics.retries.labels(self.name, "halted").inc()
                await self._set_state("halted", result.reason)
                delay = retry.max_backoff
            else:
                assert isinstance(result, RetryLater)
                metrics.retries.labels(self.name, "retry").inc()
                if self.state != "halted":
                    await self._set_state("retrying", result.reason)
                delay = backoff.next_delay(result.after)
                self.log.debug("retry_scheduled", batch=batch.id, attempt=attempt, delay=round(delay, 3),
                               reason=result.reason)
            if await self._stopped_within(delay):
                self.log.info("batch_left_for_restart", batch=batch.id,
                              hint="waiting for a retry when the relay stopped; it is sent first on restart")
                return

    def _log_rejected(self, batch: Batch, reasons: dict[int, str], resend: int) -> None:
        if reasons:
            self.log.warning("entries_dead_lettered", batch=batch.id, count=len(reasons),
                             first_reason=next(iter(reasons.values())), resend=resend)

    async def _attempt(self, batch: Batch) -> Result:
        timeout = self.destination.attempt_timeout(self.config.delivery.send_timeout)
        started = time.perf_counter()
        try:
            with trio.move_on_after(timeout) as scope:
                result: Result = await self.destination.send(batch)
            if scope.cancelled_caught:
                result = RetryLater(f"no answer within send_timeout ({timeout:g}s)")
        except Exception as exc:  # a plugin bug must not lose entries: log it and retry
            self.log.exception("send_failed_unexpectedly", batch=batch.id)
            result = RetryLater(f"unexpected {type(exc).__name__}: {exc}")
        self._m_duration.observe(time.perf_counter() - started)
        self._m_batch.observe(len(batch))
        return result

    async def _finish(self, batch: Batch, delivered: list[int] | range, reasons: dict[int, str],
                      resend_from: int | None = None) -> None:
        dead = [(batch.entries[i].seq, scrub(reasons[i])) for i in sorted(reasons)]
        newest = max((batch.entries[i].occurred_at for i in delivered), default=None)
        moved = await self.journal.finish_batch(
            self.name, batch.first_seq, delivered=len(delivered), newest_occurred_at=newest,
            dead_letters=dead, resend_from=resend_from)
        self._m_delivered.inc(len(delivered))
        self._m_dead.inc(len(dead))
        self.dead_letters += len(dead)
        if delivered:
            self.last_success_at = time.time()
            self.newest_delivered = max(self.newest_delivered or 0.0, newest or 0.0)
        if delivered or dead:
            await self._set_state("up", None)
        await self._moved(moved)

    async def _moved(self, offset: int | None) -> None:
        # Two batches finishing together each read an offset from the journal and then await the state
        # change; the one that resumes last may carry the older offset. The offset only moves forward.
        if offset is not None and offset > self.offset:
            self.offset = offset
            self._notify()
            if self.journal.statistics().full:
                self.journal.request_prune()
            await self._refresh_head(offset)

    async def _refresh_head(self, offset: int) -> None:
        """Re-read the entry right after `offset` (unless the offset has moved on meanwhile)."""
        rows = await self.reader.read_after(offset, 1)
        if self.offset == offset:
            self.oldest_undelivered = rows[0][2] if rows else None

    async def _set_state(self, state: str, reason: str | None) -> None:
        # Reasons quote what peers answered (an error page may echo a credential). Logs are scrubbed when
        # written, but the journal is read by `relay status` and `relay dlq` in other processes: scrub here.
        reason = scrub(reason) if reason is not None else None
        if state == self.state:
            self.reason = reason
            if not self._state_recorded and not self._state_writes:  # the disk was full: try at each retry
                await self._record_state()
                self._notify()
            return
        previous = self.state
        if state == "halted":
            self.log.error("destination_halted", reason=reason,
                           hint="fix the configuration or credentials; retrying every retry.max_backoff")
        elif state == "retrying":
            self.log.warning("destination_retrying", reason=reason)
        elif previous != "starting":
            self.log.info("destination_recovered", previous=previous)
        self.state, self.reason = state, reason  # before the write: batches failing together log it once
        self._state_recorded = False
        await self._record_state()
        self._notify()

    async def _record_state(self) -> None:
        """Write the state for `relay status`. Delivery never waits for it: with the disk full, batches in
        flight go on being retried (and sent), and the state is written at a later retry or change."""
        self._state_version += 1
        version = self._state_version
        self._state_writes += 1
        try:
            await self.journal.set_destination_state(self.name, self.state, self.reason)
        except JournalUnavailable:
            return
        finally:
            self._state_writes -= 1
        if version == self._state_version:  # no newer state was written meanwhile
            self._state_recorded = True
