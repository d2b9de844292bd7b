"""Process-wide settings for a long-running relay: the open-files limit and the garbage collector."""

from __future__ import annotations

import gc
import resource

import structlog

GC_THRESHOLDS = (5000, 10, 10)
"""CPython's default (700, 10, 10) runs a collection every 700 new containers. Audit entries are parsed
into thousands of acyclic dicts and lists per batch (freed by reference counting, never by the collector),
and each collection walks every live one: profiling showed the collector taking three quarters of the
time spent parsing entries. Collecting less often has a price wherever garbage sits in cycles: httpx left
each request in one, holding its body until a collection, so memory grew with the threshold (file import ->
HEC, 200k entries: 700 -> 16.5k/s, 133 MiB; 5,000 -> 17.8k/s, 165 MiB; 50,000 -> 18.7k/s, 282 MiB). The
plugins' client (`relay.http_client`) now ends that cycle itself."""


def raise_open_files_limit() -> None:
    """Take the hard limit of open files as the soft one. Every connection to a push receiver is a file
    descriptor, and systemd's default soft limit is 1024: that many idle or slow clients would leave
    none for valid senders (and for the journal and the destinations' connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # a sandbox may refuse; the relay works with what it has
            structlog.get_logger("relay").warning("open_files_limit_unchanged", soft=soft, hard=hard, error=str(exc))
            return
        structlog.get_logger("relay").info("open_files_limit_raised", previous=soft, now=target)


def tune_garbage_collector() -> None:
    """Move everything alive after start-up out of the collector's view and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
