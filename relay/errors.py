"""Exceptions, arranged by the decision a caller takes.

    RelayError
    ├── ConfigError          the configuration is wrong: print every issue, refuse to start
    ├── PluginError          a plugin is broken or two plugins claim one type name
    ├── JournalError         the durable journal cannot do what was asked
    │   └── JournalUnavailable   intake must stop for now (full, disk full, shutting down):
    │                            a push source answers 503 + Retry-After, a poller waits
    └── EntryError           one input entry is invalid (it goes to quarantine, never dropped)

Delivery outcomes are not exceptions: a destination returns a result (see `relay.destination`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "EntryError",
    "JournalError",
    "JournalUnavailable",
    "PluginError",
    "RelayError",
]


class RelayError(Exception):
    """Base class of every error audit-relay raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration file: where it is and what is wrong."""

    path: str
    """Dotted key path, e.g. `destinations.splunk.batch.max_bytes`; empty for the whole file."""
    message: str
    file: str = ""
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(RelayError):
    """The configuration has one or more problems; `issues` lists every one of them."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class PluginError(RelayError):
    """A plugin failed to load, or two plugins register the same type name."""


class JournalError(RelayError):
    """The journal failed (I/O error, corruption, schema from a newer version)."""


class JournalUnavailable(JournalError):
    """Intake must pause: the journal is full, the disk is full, or the relay is stopping."""

    def __init__(self, reason: str, retry_after: float = 5.0) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


class EntryError(RelayError):
    """An entry failed validation; `field` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)
