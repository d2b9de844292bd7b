"""The source contract: how entries get into the relay.

A source receives or fetches entries and hands them to its `Intake`. `submit()` returns only after the
entries (and the source's new cursor, in the same transaction) are durable in the journal, so a push
source may acknowledge its sender once `submit()` returns. When the journal cannot take more,
`submit()` raises `JournalUnavailable`: a push source answers 503 with Retry-After, a poller waits on
`wait_writable()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import trio

from relay.context import Context
from relay.entry import Prepared
from relay.settings import Settings

__all__ = ["UNCHANGED", "Intake", "Source", "SubmitResult"]


class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()
"""Pass as `cursor=` to leave the source's cursor as it is."""


@dataclass(frozen=True)
class SubmitResult:
    accepted: int
    """New entries now in the journal."""
    duplicates: int
    """Entries the journal already held (same `id`, or same content)."""
    quarantined: int
    """Entries that failed validation and were kept in the quarantine store."""
    problems: Sequence[tuple[int, str]] = field(default_factory=tuple)
    """`(index in the submitted list, reason)` for each quarantined entry."""


class Intake(Protocol):
    """A source's only way into the journal."""

    @property
    def cursor(self) -> str | None:
        """The cursor committed with this source's last submit, or None at first start."""
        ...

    @property
    def writable(self) -> bool:
        """False while the journal is full or the relay is stopping."""
        ...

    async def submit(self, items: Sequence[Any], *, cursor: str | None = UNCHANGED,
                     labels: Sequence[str] | None = None, raws: Sequence[bytes] | None = None) -> SubmitResult:
        """Validate and journal `items` (parsed JSON values), with `cursor`, in one transaction.

        An invalid item is quarantined with a reason that starts with its label (`labels[i]`, e.g. "line 12
        (byte 4096)"; default "entry i") and, when given, its raw input (`raws[i]`) instead of its JSON.
        """
        ...

    async def submit_prepared(self, batch: Prepared, *, cursor: str | None = UNCHANGED) -> SubmitResult:
        """Journal a batch already validated by `relay.prepare_batch` (typically in a worker process, with
        `Context.workers`), with `cursor`, in one transaction: `submit()` without the validation."""
        ...

    async def quarantine(self, raw: bytes, reason: str) -> None:
        """Keep input that could not be parsed at all, with the reason, in the quarantine store."""
        ...

    async def wait_writable(self) -> None:
        """Return once the journal can take entries again."""
        ...


class Source:
    """Base class of source plugins: set `type_name` and `Settings`, implement `run()`."""

    type_name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = Settings
    parses_in_workers: ClassVar[bool] = False
    """True for a source that hands most of its input to `context.workers` (an import): the relay then
    starts the parse workers while it starts, so its first job does not wait for a spawn. Otherwise they
    start at the first job, and a relay that never needs one holds none (each is ~50 MiB)."""

    def __init__(self, context: Context, settings: Any) -> None:
        self.context = context
        self.name = context.name
        self.settings = settings
        self.log = context.log

    async def open(self) -> None:
        """Prepare (read files, build clients). Listeners are bound in `run()` before `started()`."""

    async def run(self, intake: Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Produce entries until cancelled; call `task_status.started()` once listening or polling."""
        raise NotImplementedError

    async def check(self) -> str:
        """Test what can be tested without taking entries (bind, credentials); raise `CheckFailed`."""
        return "no check available for this source type"

    async def reconfigure(self, settings: Any) -> bool:
        """On reload with changed settings: apply them in place and return True if this type can (a push
        receiver whose listen address is unchanged swaps its token without rebinding), or return False
        (the default) to be stopped and started again with them, resuming from the committed cursor."""
        return False

    async def close(self) -> None:
        """Release what `open()` acquired."""
