"""What a parse worker process runs around each job.

Standard library only: a worker imports this module (and the job's own) when it starts. Before, the wrapper
lived in `relay.workers`, so each worker imported the relay's whole package, trio, pydantic and
prometheus_client among it, before its first job (~0.3 s, on the path of the first entry of an import).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["WORKER_NICENESS", "in_worker", "nothing", "without_collector"]

T = TypeVar("T")

WORKER_NICENESS = 10
"""How much lower than the relay's a worker's CPU priority is. Parsing then takes only the CPU that the
event loop (the journal, deliveries, every request) leaves, so `parse_workers: auto` can run one worker per
core. Measured on the 2-core peer job (file import -> HEC): 2 workers at +10 gave 39.6k entries/s, 2 at the
relay's priority 38.1k, 1 (the former default) 35.8k (medians of 5 runs)."""
_lowered = False


def nothing() -> None:
    """The warm-up job: it makes the worker start."""
    return None


def in_worker(fn: Callable[..., T], *args: Any) -> T:
    """How a worker process runs a job: at a lower CPU priority (set at its first job), without the collector."""
    global _lowered
    if not _lowered:
        _lowered = True
        with contextlib.suppress(OSError):  # a sandbox may refuse; the job runs all the same
            os.nice(WORKER_NICENESS)
    return without_collector(fn, *args)


def without_collector(fn: Callable[..., T], *args: Any) -> T:
    """Run a job with the cyclic garbage collector paused.

    A job builds thousands of containers (parsed JSON) that hold no cycles; each collection the allocations
    trigger would walk all of them again. Measured on 1 MiB blocks of JSON lines: 22.6 us per entry with
    the collector, 15.2 without."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return fn(*args)
    finally:
        if enabled:
            gc.enable()
