"""audit-relay: relay audit-log entries to your own systems without losing one.

This package root is the surface for plugin authors; everything else is internal.

Its names are imported when first used (PEP 562): a parse worker process imports `relay.entry` and must not
pay for trio, pydantic and prometheus_client, which importing them all here would cost it (~0.3 s before its
first job, on the path of an import's first entry).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.context import CheckFailed, Context, StateStore
    from relay.destination import (
        Batch,
        BatchDefaults,
        Delivered,
        Destination,
        Entry,
        Halted,
        Rejected,
        Result,
        RetryLater,
    )
    from relay.entry import Prepared, prepare_batch
    from relay.errors import ConfigError, EntryError, JournalError, JournalUnavailable, PluginError, RelayError
    from relay.hookspecs import hookimpl
    from relay.settings import ByteSize, Duration, HostPort, Secret, Settings
    from relay.source import UNCHANGED, Intake, Source, SubmitResult

__version__ = "0.1.0"

__all__ = [
    "UNCHANGED",
    "Batch",
    "BatchDefaults",
    "ByteSize",
    "CheckFailed",
    "ConfigError",
    "Context",
    "Delivered",
    "Destination",
    "Duration",
    "Entry",
    "EntryError",
    "Halted",
    "HostPort",
    "Intake",
    "JournalError",
    "JournalUnavailable",
    "PluginError",
    "Prepared",
    "Rejected",
    "RelayError",
    "Result",
    "RetryLater",
    "Secret",
    "Settings",
    "Source",
    "StateStore",
    "SubmitResult",
    "__version__",
    "hookimpl",
    "prepare_batch",
]

_LAZY = {
    "CheckFailed": "relay.context",
    "Context": "relay.context",
    "StateStore": "relay.context",
    "Batch": "relay.destination",
    "BatchDefaults": "relay.destination",
    "Delivered": "relay.destination",
    "Destination": "relay.destination",
    "Entry": "relay.destination",
    "Halted": "relay.destination",
    "Rejected": "relay.destination",
    "Result": "relay.destination",
    "RetryLater": "relay.destination",
    "Prepared": "relay.entry",
    "prepare_batch": "relay.entry",
    "ConfigError": "relay.errors",
    "EntryError": "relay.errors",
    "JournalError": "relay.errors",
    "JournalUnavailable": "relay.errors",
    "PluginError": "relay.errors",
    "RelayError": "relay.errors",
    "hookimpl": "relay.hookspecs",
    "ByteSize": "relay.settings",
    "Duration": "relay.settings",
    "HostPort": "relay.settings",
    "Secret": "relay.settings",
    "Settings": "relay.settings",
    "UNCHANGED": "relay.source",
    "Intake": "relay.source",
    "Source": "relay.source",
    "SubmitResult": "relay.source",
}
"""Each public name and the module that defines it."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
