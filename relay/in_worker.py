"""What a parse worker process runs around each job.

Standard library only: a worker imports this module (and the job's own) when it starts. Before, the wrapper
lived in `relay.workers`, so each worker imported the relay's whole package, trio, pydantic and
prometheus_client among it, before its first job (~0.3 s, on the path of the first entry of an import).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["nothing", "without_collector"]

T = TypeVar("T")


def nothing() -> None:
    """The warm-up job: it makes the worker start."""
    return None


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
