"""Parse workers: CPU-heavy, pure work (parsing and validating input) in worker processes.

The event loop's thread runs the journal, the delivery loops and every request; parsing and validating a
large body or an import chunk there takes the GIL from all of them, and a second thread would only fight
for it. A worker process runs on another core. Measured on the project's 2-core machine
(bench/bench_peer.py): validating 650-byte entries costs ~13.5 us each on the event loop, ~2 us (sending
the bytes and unpickling the result) when a worker does it.

trio-parallel runs the processes: it spawns them on first use, keeps them for reuse, kills one whose job is
cancelled, and they exit when the relay does (even after `kill -9`: their end of the pipe closes). When a
source imports (`Source.parses_in_workers`) the relay starts them first thing, while it opens the journal, so
its first chunk does not wait for a spawn; otherwise at the first large request. One idle for 10 minutes
exits (~50 MiB each) and is started again when needed. A job's wrapper lives in `relay.in_worker`, light to
import.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import structlog
import trio
import trio_parallel

from relay import metrics
from relay.in_worker import in_worker, nothing, without_collector

__all__ = ["Workers", "auto_count", "open_workers"]

T = TypeVar("T")
log = structlog.get_logger("relay.workers")

IDLE_TIMEOUT = 600.0
"""A worker idle this long exits, giving its memory back (a large import leaves ~60 MiB in each); the next job
starts one again (~0.3 s)."""
MAX_FAILURES = 3
"""Consecutive worker failures after which the relay stops using workers (and says so)."""


def auto_count() -> int:
    """`parse_workers: auto`: one per core, at most 2 (they run at a lower priority than the event loop, so
    they take only the CPU it leaves); none on a single core, where a worker would only add the round trip."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(2, cores) if cores > 1 else 0


class Workers:
    """Where `run(fn, *args)` runs `fn`: in a worker process, or inline when there are none.

    `fn` must be a module-level function, and its arguments and result picklable: keep both compact (bytes
    in, plain tuples out), since the event loop's thread unpickles the result."""

    def __init__(self, count: int = 0, context: Any = None) -> None:
        self.count = count
        self._context = context
        self._limiter = trio.CapacityLimiter(max(1, count))
        self._failures = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._context is not None:
            try:
                result: T = await self._context.run_sync(in_worker, fn, *args, limiter=self._limiter)
            except (trio_parallel.BrokenWorkerError, OSError) as exc:
                self._failed(exc)  # the job is a pure function: running it here instead loses nothing
            else:
                self._failures = 0
                return result
        await trio.lowlevel.checkpoint()
        return without_collector(fn, *args)

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures < MAX_FAILURES:
            log.warning("parse_worker_failed", error=f"{type(exc).__name__}: {exc}",
                        hint="this job ran on the event loop instead; the next one starts a new worker")
            return
        self._context = None
        metrics.parse_workers.set(0)
        log.error("parse_workers_disabled", failures=self._failures, error=f"{type(exc).__name__}: {exc}",
                  hint="input is parsed on the event loop from now on (slower, nothing lost); see why worker "
                       "processes cannot start, e.g. a process or memory limit, and restart the relay")

    async def warm_up(self) -> None:
        """Start every worker now (a spawn takes ~0.3 s), so the first large request does not wait for it."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.count):
                nursery.start_soon(self.run, nothing)


@asynccontextmanager
async def open_workers(count: int) -> AsyncIterator[Workers]:
    """`count` worker processes (started when first used) for the lifetime of the block; 0: inline."""
    metrics.parse_workers.set(max(0, count))
    if count <= 0:
        yield Workers(0)
        return
    async with trio_parallel.open_worker_context(idle_timeout=IDLE_TIMEOUT, grace_period=5.0) as context:
        yield Workers(count, context)
