"""audit-relay: relay audit-log entries to your own systems without losing one.

This package root is the surface for plugin authors; everything else is internal.
"""

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
